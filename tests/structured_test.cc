// The constraint engine (structured/): grammars accept exactly their language byte by byte, the
// token masks equal a brute-force check of every token, and random walks through the masks (a
// model that knows nothing) end in output that parses and keeps the schema.
#include <gtest/gtest.h>

#include <filesystem>
#include <nlohmann/json.hpp>
#include <random>
#include <regex>
#include <set>

#include "model/tokenizer.h"
#include "structured/json_schema.h"
#include "structured/matcher.h"
#include "structured/token_masker.h"

namespace gemma2::structured {
namespace {

using json = nlohmann::json;

// Whether the grammar matches `text` whole.
bool Matches(const Grammar& g, const std::string& text) {
  auto start = Start(g);
  if (!start.ok()) return false;
  State s = *start, next;
  for (char c : text) {
    Step(g, s, static_cast<uint8_t>(c), next);
    if (next.empty()) return false;
    std::swap(s, next);
  }
  return Complete(s);
}

std::shared_ptr<const Grammar> Compile(const nlohmann::ordered_json& schema) {
  auto g = JsonSchemaGrammar(schema);
  EXPECT_TRUE(g.ok()) << g.status().ToString();
  return g.ok() ? *g : nullptr;
}

TEST(GrammarTest, JsonObjectsCompactAndExact) {
  auto g = JsonGrammar();
  ASSERT_TRUE(g.ok());
  for (const char* ok : {"{}", R"({"a":1})", R"({"a":[1,2.5,-3e10,true,null],"b":{"c":"\u00e9\n"}})",
                         "{\"k\":\"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80\"}", R"({"":0})"}) {
    EXPECT_TRUE(Matches(**g, ok)) << ok;
  }
  for (const char* bad : {"", "{", "[]", R"({"a":01})", R"({"a":1,})", R"({"a" :1})", R"({a:1})",
                          "{\"a\":\"\x01\"}", "{\"a\":\"\xc3\"}", "{\"a\":\"\xed\xa0\x80\"}",
                          R"({"a":"\x"})", R"({"a":1.})", R"({"a":12345678901234567})"}) {
    EXPECT_FALSE(Matches(**g, bad)) << bad;
  }
}

TEST(GrammarTest, SchemaKeywords) {
  const auto schema = nlohmann::ordered_json::parse(R"({
    "type": "object",
    "properties": {
      "id": {"type": "integer", "minimum": -5, "maximum": 120},
      "name": {"type": "string", "minLength": 1, "maxLength": 3},
      "tags": {"type": "array", "items": {"enum": ["x", 2, null]}, "minItems": 1, "maxItems": 2},
      "kind": {"const": "k"},
      "maybe": {"type": ["number", "null"]},
      "ref": {"$ref": "#/$defs/flag"}
    },
    "required": ["id", "kind"],
    "additionalProperties": false,
    "$defs": {"flag": {"anyOf": [{"type": "boolean"}, {"type": "string", "maxLength": 0}]}}
  })");
  auto g = Compile(schema);
  ASSERT_TRUE(g);
  for (const char* ok : {R"({"id":-5,"kind":"k"})", R"({"id":120,"name":"abc","kind":"k"})",
                         R"({"id":0,"tags":["x",2],"kind":"k","maybe":null,"ref":true})",
                         R"({"id":7,"kind":"k","maybe":-0.5e3,"ref":""})", R"({"id":99,"kind":"k"})"}) {
    EXPECT_TRUE(Matches(*g, ok)) << ok;
  }
  for (const char* bad : {R"({"id":121,"kind":"k"})", R"({"id":-6,"kind":"k"})", R"({"kind":"k"})",
                          R"({"id":1})", R"({"id":1,"name":"","kind":"k"})",
                          R"({"id":1,"name":"abcd","kind":"k"})", R"({"id":1,"tags":[],"kind":"k"})",
                          R"({"id":1,"tags":["x","x","x"],"kind":"k"})", R"({"kind":"k","id":1})",
                          R"({"id":1,"kind":"k","extra":1})", R"({"id":01,"kind":"k"})",
                          R"({"id":1,"kind":"k","ref":"a"})", R"({"id":-0,"kind":"k"})"}) {
    EXPECT_FALSE(Matches(*g, bad)) << bad;
  }
}

TEST(GrammarTest, IntegerRangesAreExact) {
  for (auto [lo, hi] : std::vector<std::pair<int, int>>{{-120, 7}, {0, 0}, {3, 1999}, {-9, -1}, {10, 10}}) {
    auto g = Compile(nlohmann::ordered_json{{"type", "integer"}, {"minimum", lo}, {"maximum", hi}});
    ASSERT_TRUE(g);
    for (int v = -2100; v <= 2100; ++v) {
      EXPECT_EQ(Matches(*g, std::to_string(v)), v >= lo && v <= hi) << lo << ".." << hi << ": " << v;
    }
    EXPECT_FALSE(Matches(*g, "-0"));
  }
  auto ex = Compile(nlohmann::ordered_json{{"type", "integer"}, {"exclusiveMinimum", 0}, {"exclusiveMaximum", 3}});
  ASSERT_TRUE(ex);
  EXPECT_FALSE(Matches(*ex, "0"));
  EXPECT_TRUE(Matches(*ex, "1"));
  EXPECT_TRUE(Matches(*ex, "2"));
  EXPECT_FALSE(Matches(*ex, "3"));
}

// One bound open: every width up to 16 digits, said in few rules (each width's full range once).
TEST(GrammarTest, HalfOpenIntegerRangesStaySmall) {
  auto g = Compile(nlohmann::ordered_json{{"type", "integer"}, {"minimum", 12}});
  ASSERT_TRUE(g);
  EXPECT_LT(g->rules.size(), 2000u);
  for (const char* yes : {"12", "13", "99", "100", "9999999999999999", "1000000000000000"})
    EXPECT_TRUE(Matches(*g, yes)) << yes;
  for (const char* no : {"11", "0", "-5", "10000000000000000", "012"}) EXPECT_FALSE(Matches(*g, no)) << no;
  auto neg = Compile(nlohmann::ordered_json{{"type", "integer"}, {"maximum", -3}});
  ASSERT_TRUE(neg);
  EXPECT_TRUE(Matches(*neg, "-3"));
  EXPECT_TRUE(Matches(*neg, "-9999999999999999"));
  EXPECT_FALSE(Matches(*neg, "-2"));
}

// Tool calls: {"name":NAME,"arguments":ARGS} with each tool's own $defs, one call or a list.
TEST(GrammarTest, ToolCalls) {
  const std::vector<ToolSchema> tools = {
      {"f", nlohmann::ordered_json::parse(R"({"type":"object","properties":{"x":{"$ref":"#/$defs/d"}},
          "required":["x"],"$defs":{"d":{"enum":[1,2]}}})")},
      {"g", nlohmann::ordered_json::parse(R"({"type":"object","properties":{"x":{"$ref":"#/$defs/d"}},
          "required":["x"],"$defs":{"d":{"type":"boolean"}}})")},
      {"h", nullptr}};
  auto one = ToolCallsGrammar(tools, false);
  ASSERT_TRUE(one.ok()) << one.status().ToString();
  EXPECT_TRUE(Matches(**one, R"({"name":"f","arguments":{"x":2}})"));
  EXPECT_TRUE(Matches(**one, R"({"name":"g","arguments":{"x":true}})"));
  EXPECT_FALSE(Matches(**one, R"({"name":"g","arguments":{"x":2}})"));  // g's own $defs
  EXPECT_TRUE(Matches(**one, R"({"name":"h","arguments":{"any":[1]}})"));
  EXPECT_FALSE(Matches(**one, R"([{"name":"f","arguments":{"x":1}}])"));
  auto list = ToolCallsGrammar(tools, true);
  ASSERT_TRUE(list.ok());
  EXPECT_TRUE(Matches(**list, R"([{"name":"f","arguments":{"x":1}},{"name":"h","arguments":{}}])"));
  EXPECT_TRUE(Matches(**list, R"({"name":"f","arguments":{"x":1}})"));
  EXPECT_FALSE(Matches(**list, "[]"));
  auto bad = ToolCallsGrammar({{"k", nlohmann::ordered_json::parse(R"({"type":"string","format":"email"})")}}, false);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("function 'k': json_schema: keyword 'format'"), std::string::npos)
      << bad.status().message();
}

// A specification too large to compile is refused, not built (a body of a few bytes asking for
// millions of rules).
TEST(GrammarTest, OversizedGrammarsAreRefused) {
  nlohmann::ordered_json props = nlohmann::ordered_json::object();
  for (const char* name : {"p0", "p1", "p2", "p3"}) props[name] = {{"type", "string"}, {"maxLength", 65536}};
  auto g = JsonSchemaGrammar({{"type", "object"}, {"properties", props}});
  ASSERT_FALSE(g.ok());
  EXPECT_NE(g.status().message().find("exceed"), std::string::npos) << g.status().message();
  std::string re;
  for (int i = 0; i < 200; ++i) re.append("(a{0,1000})");  // 1000 optional rules each
  auto r = RegexGrammar(re);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("exceed"), std::string::npos) << r.status().message();
  // A few megabytes of one literal, of enum entries, of choices: refused, not built.
  auto big = JsonSchemaGrammar({{"const", std::string(3 << 20, 'x')}});
  ASSERT_FALSE(big.ok());
  EXPECT_NE(big.status().message().find("exceed"), std::string::npos) << big.status().message();
  auto many = JsonSchemaGrammar({{"enum", std::vector<int>(2 << 20, 7)}});
  ASSERT_FALSE(many.ok());
  EXPECT_NE(many.status().message().find("exceed"), std::string::npos) << many.status().message();
  auto choices = ChoiceGrammar(std::vector<std::string>(1 << 20, "ab"));
  ASSERT_FALSE(choices.ok());
  EXPECT_NE(choices.status().message().find("exceed"), std::string::npos);
}

TEST(GrammarTest, WhatCannotCompileNamesTheKeyword) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {R"({"type":"string","pattern":"a+"})", "'pattern'"},
      {R"({"allOf":[{"type":"string"}]})", "'allOf'"},
      {R"({"type":"number","minimum":1})", "'minimum'"},
      {R"({"$ref":"#/$defs/a","$defs":{"a":{"type":"array","items":{"$ref":"#/$defs/a"}}}})", "recursive"},
      {R"({"$ref":"#/$defs/missing"})", "does not name"},
      {R"({"type":"integer","minimum":5,"maximum":4})", "no integer"},
      {R"({"type":"strin"})", "unknown type 'strin'"},
      {R"({"type":"object","properties":{"a":{}},"required":["b"]})", "'b'"},
      {R"(false)", "matches nothing"},
  };
  for (const auto& [text, want] : cases) {
    auto g = JsonSchemaGrammar(nlohmann::ordered_json::parse(text));
    ASSERT_FALSE(g.ok()) << text;
    EXPECT_NE(g.status().message().find(want), std::string::npos) << g.status().message();
  }
}

TEST(GrammarTest, RegexAndChoice) {
  auto re = RegexGrammar(R"(^\d{3}-[a-z]+(x|yz)?\.$)");
  ASSERT_TRUE(re.ok()) << re.status().ToString();
  for (const char* ok : {"123-abc.", "000-qx.", "999-zyz."}) EXPECT_TRUE(Matches(**re, ok)) << ok;
  for (const char* bad : {"12-abc.", "123-.", "123-abc", "123-ABC.", "1234-a."}) EXPECT_FALSE(Matches(**re, bad)) << bad;
  for (const char* bad_pattern : {"(a", "a{2,1}", "[z-a]", "(?=a)", "\\1", "*a"}) {
    EXPECT_FALSE(RegexGrammar(bad_pattern).ok()) << bad_pattern;
  }
  auto ch = ChoiceGrammar({"yes", "no", "maybe not"});
  ASSERT_TRUE(ch.ok());
  EXPECT_TRUE(Matches(**ch, "maybe not"));
  EXPECT_FALSE(Matches(**ch, "maybe"));
  EXPECT_FALSE(Matches(**ch, "yesno"));
}

// Masks equal checking every token on its own, state after state of a random walk through the
// masks; the walk's output then parses and, at its end, nothing but stop tokens... stops.
void CheckMasksAndWalk(std::shared_ptr<const Grammar> g, std::shared_ptr<const TokenVocabulary> v,
                       uint64_t seed, int brute_states, const std::function<void(const std::string&)>& check,
                       int* ended = nullptr) {
  TokenMasker masker(g, v);
  std::mt19937_64 rng(seed);
  auto start = Start(*g);
  ASSERT_TRUE(start.ok());
  State s = *start;
  std::string out;
  TokenMask mask;
  bool stopped = false;
  for (int step = 0; step < 400 && !stopped; ++step) {
    masker.Allowed(s, mask);
    if (step < brute_states) {
      for (int32_t id = 0; id < v->size(); ++id) {
        const std::string_view b = v->bytes(id);
        bool want = !b.empty() && Takes(*g, s, b);
        for (int32_t stop : v->stop_ids()) want = want || (id == stop && Complete(s));
        ASSERT_EQ(mask.Test(id), want) << "step " << step << " token " << id << " '" << b << "' after '" << out << "'";
      }
    }
    std::vector<int32_t> allowed;
    for (int32_t id = 0; id < v->size(); ++id)
      if (mask.Test(id)) allowed.push_back(id);
    ASSERT_FALSE(allowed.empty()) << "a dead end after '" << out << "'";
    // Prefer stopping once complete, now and then, so walks end.
    int32_t pick = allowed[std::uniform_int_distribution<size_t>(0, allowed.size() - 1)(rng)];
    if (Complete(s) && rng() % 3 == 0) pick = v->stop_ids().front();
    if (std::find(v->stop_ids().begin(), v->stop_ids().end(), pick) != v->stop_ids().end()) {
      ASSERT_TRUE(Complete(s)) << "a stop token before the structure was complete: '" << out << "'";
      stopped = true;
      break;
    }
    const std::string_view b = v->bytes(pick);
    State next = s;
    for (char c : b) {
      State n2;
      Step(*g, next, static_cast<uint8_t>(c), n2);
      next = std::move(n2);
    }
    ASSERT_FALSE(next.empty());
    s = std::move(next);
    out += b;
  }
  if (stopped) check(out);
  if (stopped && ended) ++*ended;
}

// A small vocabulary with the hard cases: pieces across structural characters, a multi-byte
// character split over byte tokens, whitespace runs, digits in chunks.
std::shared_ptr<const TokenVocabulary> SmallVocabulary() {
  std::vector<std::string> t = {"", "{", "}", "\"", ":", ",", "[", "]", "{\"", "\":", "\",", "\"}",
                                "\"]", "},", "a", "b", "id", "name", "ab", " ", "  ", "\n", "1", "0",
                                "12", "-", ".", "5e", "e", "true", "false", "null", "tru", "nul",
                                "\\", "\\n", "\\u00", "e9", "\xc3", "\xa9", "\xc3\xa9", "\xe2\x82",
                                "\xac", "x", "\":\"", "\"id\":", "tags", "k", "\"k\"", "99", "120"};
  for (int c = 0x20; c < 0x7f; ++c) t.push_back(std::string(1, static_cast<char>(c)));
  t.push_back("<eos>");
  const int32_t eos = static_cast<int32_t>(t.size()) - 1;
  t.back().clear();  // a control token: no bytes
  return std::make_shared<const TokenVocabulary>(t, std::vector<int32_t>{eos});
}

TEST(TokenMaskerTest, SmallVocabularyMasksEqualBruteForceAndWalksParse) {
  const auto v = SmallVocabulary();
  auto json_g = JsonGrammar();
  ASSERT_TRUE(json_g.ok());
  int ended = 0;
  std::set<std::string> outputs;
  for (uint64_t seed = 1; seed <= 30; ++seed) {
    CheckMasksAndWalk(*json_g, v, seed, 400, [&](const std::string& out) {
      EXPECT_TRUE(json::accept(out)) << out;
      EXPECT_TRUE(json::parse(out).is_object()) << out;
      outputs.insert(out);
    }, &ended);
  }
  EXPECT_GE(ended, 10);  // the walks end, and differ (the check is not vacuous)
  EXPECT_GE(outputs.size(), 5u);
  const auto schema = nlohmann::ordered_json::parse(R"({"type":"object","properties":{
      "id":{"type":"integer","minimum":-5,"maximum":120},"name":{"type":"string","maxLength":4},
      "tags":{"type":"array","items":{"type":"boolean"},"maxItems":3}},"required":["id","name"]})");
  auto g = Compile(schema);
  ended = 0;
  for (uint64_t seed = 1; seed <= 30; ++seed) {
    CheckMasksAndWalk(g, v, seed, 400, [](const std::string& out) {
      ASSERT_TRUE(json::accept(out)) << out;
      const json j = json::parse(out);
      ASSERT_TRUE(j.contains("id") && j["id"].is_number_integer()) << out;
      EXPECT_GE(j["id"].get<int64_t>(), -5);
      EXPECT_LE(j["id"].get<int64_t>(), 120);
      ASSERT_TRUE(j["name"].is_string()) << out;
    }, &ended);
  }
  EXPECT_GE(ended, 10);
}

std::shared_ptr<const TokenVocabulary> GemmaVocabulary() {
  const auto path = std::filesystem::path(GEMMA2_SOURCE_DIR) / "../shared/tokenizers/gemma2-tokenizer.model";
  if (!std::filesystem::exists(path)) return nullptr;
  auto tok = Tokenizer::Load(path);
  if (!tok.ok()) return nullptr;
  return std::make_shared<const TokenVocabulary>((*tok)->TokenBytes(), std::vector<int32_t>{1, 107});
}

TEST(TokenMaskerTest, GemmaTokenBytesConcatenateToTheDecodedText) {
  const auto path = std::filesystem::path(GEMMA2_SOURCE_DIR) / "../shared/tokenizers/gemma2-tokenizer.model";
  if (!std::filesystem::exists(path)) GTEST_SKIP() << "skipped: ../shared/tokenizers is absent";
  auto tok = Tokenizer::Load(path);
  ASSERT_TRUE(tok.ok());
  const std::vector<std::string> bytes = (*tok)->TokenBytes();
  std::mt19937 rng(7);
  for (int trial = 0; trial < 200; ++trial) {
    std::vector<int32_t> ids;
    std::string want;
    for (int i = 0; i < 12; ++i) {
      int32_t id;
      do {
        id = static_cast<int32_t>(rng() % bytes.size());
      } while (bytes[static_cast<size_t>(id)].empty());
      ids.push_back(id);
      want += bytes[static_cast<size_t>(id)];
    }
    auto text = (*tok)->Decode(ids);
    ASSERT_TRUE(text.ok());
    // Byte pieces that do not form UTF-8 decode to U+FFFD: compare where the bytes are UTF-8.
    if (std::string(*text).find("\xef\xbf\xbd") != std::string::npos) continue;
    EXPECT_EQ(*text, want);
  }
}

TEST(TokenMaskerTest, GemmaVocabularyMasksEqualBruteForceAndWalksParse) {
  const auto v = GemmaVocabulary();
  if (!v) GTEST_SKIP() << "skipped: ../shared/tokenizers is absent";
  const auto schema = nlohmann::ordered_json::parse(R"({"type":"object","properties":{
      "id":{"type":"integer","minimum":0,"maximum":999},"name":{"type":"string","maxLength":12},
      "ok":{"type":"boolean"}},"required":["id","name","ok"]})");
  auto g = Compile(schema);
  int ended = 0;
  for (uint64_t seed = 1; seed <= 3; ++seed) {
    CheckMasksAndWalk(g, v, seed, 3, [](const std::string& out) {
      ASSERT_TRUE(json::accept(out)) << out;
      const json j = json::parse(out);
      EXPECT_TRUE(j["id"].is_number_integer() && j["ok"].is_boolean() && j["name"].is_string()) << out;
    }, &ended);
  }
  EXPECT_GE(ended, 2);
}

// A grammar whose two-byte characters do not end their alternative (each must be followed by
// '!'): the masker may not take them like plain bytes. Masks equal brute force over a vocabulary
// with tokens that continue past such a character.
TEST(TokenMaskerTest, CharactersThatDoNotEndTheirAlternativeAreWalked) {
  GrammarBuilder b;
  ByteSet plain;
  for (int c = 0x20; c < 0x7f; ++c)
    if (c != '"' && c != '\\') plain.set(static_cast<size_t>(c));
  auto range = [](int lo, int hi) {
    ByteSet r;
    for (int c = lo; c <= hi; ++c) r.set(static_cast<size_t>(c));
    return GrammarBuilder::Bytes(r);
  };
  const auto cont = range(0x80, 0xbf);
  const int32_t ch = b.NewRule("char"), text = b.NewRule("text");
  b.AddAlternative(ch, {GrammarBuilder::Bytes(plain)});
  b.AddAlternative(ch, {range(0xc2, 0xdf), cont, GrammarBuilder::Byte('!')});  // the odd one
  b.AddAlternative(ch, {range(0xe0, 0xe0), range(0xa0, 0xbf), cont});  // the others as JSON's
  b.AddAlternative(ch, {range(0xe1, 0xec), cont, cont});
  b.AddAlternative(ch, {range(0xed, 0xed), range(0x80, 0x9f), cont});
  b.AddAlternative(ch, {range(0xee, 0xef), cont, cont});
  b.AddAlternative(ch, {range(0xf0, 0xf0), range(0x90, 0xbf), cont, cont});
  b.AddAlternative(ch, {range(0xf1, 0xf3), cont, cont, cont});
  b.AddAlternative(ch, {range(0xf4, 0xf4), range(0x80, 0x8f), cont, cont});
  b.AddAlternative(text, {GrammarBuilder::Ref(ch), GrammarBuilder::Ref(text)});
  b.AddAlternative(text, {GrammarBuilder::Byte('"')});
  auto g = std::make_shared<const Grammar>(b.Finish(text));
  std::vector<std::string> t = {
      "a",         "ab",         "x",         "!",    "\"",   "\xc3\xa9",     "\xc3\xa9x",
      "\xc3\xa9!", "\xc3\xa9!x", "x\xc3\xa9", "\xc3", "\xa9", "\xe2\x82\xac", "x\xe2\x82\xacx",
      "<eos>"};
  t.back().clear();
  auto v = std::make_shared<const TokenVocabulary>(
      t, std::vector<int32_t>{static_cast<int32_t>(t.size()) - 1});
  int ended = 0;
  for (uint64_t seed = 1; seed <= 20; ++seed) {
    CheckMasksAndWalk(
        g, v, seed, 400, [](const std::string& out) { EXPECT_EQ(out.back(), '"') << out; }, &ended);
  }
  EXPECT_GE(ended, 10);
}

// Inside strings, where the masker takes whole-text tokens without stepping them (TextRun, the
// per-position check of UTF-8 characters, the precomputed text masks): masks equal checking every
// one of Gemma's tokens, cold (a masker per state) and warm (one masker through all the states),
// at the start of a bounded string, after a multi-byte character, a character before its limit,
// at its limit, and inside an unbounded string and an array's bounded strings.
TEST(TokenMaskerTest, GemmaStringBodiesEqualBruteForce) {
  const auto v = GemmaVocabulary();
  if (!v) GTEST_SKIP() << "skipped: ../shared/tokenizers is absent";
  const auto schema = nlohmann::ordered_json::parse(R"({"type":"object","properties":{
      "name":{"type":"string","maxLength":40},"any":{"type":"string"},
      "tags":{"type":"array","items":{"type":"string","minLength":2,"maxLength":5}}},
      "required":["name","any","tags"]})");
  auto g = Compile(schema);
  const std::string name = "{\"name\":\"";
  const std::vector<std::string> prefixes = {
      name,
      name + "caf\xc3\xa9 ",
      name + std::string(39, 'x'),
      name + std::string(40, 'x'),
      name + std::string(37, 'x') + "\xe2\x82\xac",  // a 3-byte character to the limit
      name + "a\",\"any\":\"\xf0\x9f\x98\x80",
      name + "a\",\"any\":\"b\",\"tags\":[\"x"};
  TokenMasker warm(g, v);
  for (const std::string& prefix : prefixes) {
    auto start = Start(*g);
    ASSERT_TRUE(start.ok());
    State s = *start, next;
    for (char c : prefix) {
      Step(*g, s, static_cast<uint8_t>(c), next);
      std::swap(s, next);
      ASSERT_FALSE(s.empty()) << prefix;
    }
    TokenMasker cold(g, v);
    TokenMask a, b;
    cold.Allowed(s, a);
    warm.Allowed(s, b);
    int64_t allowed = 0;
    for (int32_t id = 0; id < v->size(); ++id) {
      const std::string_view t = v->bytes(id);
      const bool want = !t.empty() && Takes(*g, s, t);
      allowed += want;
      ASSERT_EQ(a.Test(id), want) << "cold: token " << id << " '" << t << "' after '" << prefix
                                  << "'";
      ASSERT_EQ(b.Test(id), want) << "warm: token " << id << " '" << t << "' after '" << prefix
                                  << "'";
    }
    EXPECT_GT(allowed, 0) << prefix;
  }
}

}  // namespace
}  // namespace gemma2::structured
