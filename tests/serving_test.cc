// The serving layer without HTTP: request validation, stop strings, logits processing, and the
// continuous-batching scheduler against the offline Generate/Classify loop it must agree with.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cmath>
#include <deque>
#include <filesystem>
#include <fstream>
#include <map>
#include <thread>

#include "engine/engine.h"
#include "engine/generate.h"
#include "model/random_checkpoint.h"
#include "serving/logits_processing.h"
#include "serving/request_parser.h"
#include "serving/scheduler.h"
#include "serving/session_waker.h"
#include "serving/text_output.h"
#include "serving/timed_call.h"
#include "serving/tool_calls.h"
#include "tests/test_files.h"

namespace gemma2::serving {
namespace {

using nlohmann::json;

ModelConfig Small(Architecture arch = Architecture::kCausalLM) {
  ModelConfig c;
  c.architecture = arch;
  c.vocab_size = 97;
  c.hidden_size = 32;
  c.intermediate_size = 64;
  c.num_layers = 3;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 8;
  c.query_pre_attn_scalar = 8;
  c.sliding_window = 6;
  c.max_position_embeddings = 96;
  c.layer_is_sliding = {true, false, true};
  c.eos_token_ids = {1};
  if (arch != Architecture::kCausalLM) {
    c.num_labels = 3;
    c.id2label = {"a", "b", "c"};
  }
  return c;
}

// ---- request validation ----

struct BadCase {
  std::string body;
  int status;
  std::string param;
  std::string message;
};

TEST(RequestParserTest, EveryBadInputIsAClearError) {
  const ModelConfig c = Small();
  ModelFacts facts{&c, nullptr, "m", Limits{}};
  facts.limits.strict_fields = true;
  const std::vector<BadCase> cases = {
      {R"({"prompt": [5], "model": "other"})", 404, "model", "does not exist"},
      {R"({"max_tokens": 3})", 400, "prompt", "'prompt' is required"},
      {R"({"prompt": []})", 400, "prompt", "empty prompt"},
      {R"({"prompt": [[]]})", 400, "prompt", "empty prompt"},
      {R"({"prompt": "hello"})", 400, "prompt", "no tokenizer.model"},
      {R"({"prompt": [5, 97]})", 400, "prompt", "token id 97 is outside the vocabulary [0, 97)"},
      {R"({"prompt": [-1]})", 400, "prompt", "token id -1"},
      {R"({"prompt": [5], "stop_token_ids": [200]})", 400, "stop_token_ids", "token id 200"},
      {R"({"prompt": [5], "max_tokens": 0})", 400, "max_tokens", ">= 1"},
      {R"({"prompt": [5], "max_tokens": -4})", 400, "max_tokens", ">= 1"},
      {R"({"prompt": [5, 6], "max_tokens": 95})", 400, "max_tokens",
       "96 tokens, but 2 prompt tokens + max_tokens 95 = 97"},
      {R"({"prompt": [5], "max_tokens": 1e300})", 400, "max_tokens", "must be an integer"},
      {R"({"prompt": [5], "max_tokens": "7"})", 400, "max_tokens",
       "must be an integer, not string"},
      {R"({"prompt": [5], "temperature": -0.5})", 400, "temperature", ">= 0"},
      {R"({"prompt": [5], "top_p": 0})", 400, "top_p", "(0, 1]"},
      {R"({"prompt": [5], "top_p": 1.5})", 400, "top_p", "(0, 1]"},
      {R"({"prompt": [5], "top_k": -2})", 400, "top_k", "-1 (off) or >= 0"},
      {R"({"prompt": [5], "n": 17})", 400, "n", "the limit is 16"},
      {R"({"prompt": [5], "n": 0})", 400, "n", ">= 1"},
      {R"({"prompt": [5], "logprobs": 21})", 400, "logprobs", "the limit is 20"},
      {R"({"prompt": [5], "stop": ""})", 400, "stop", "must not be empty"},
      {R"({"prompt": [5], "stop": ["a","b","c","d","e","f","g","h","i","j","k","l","m","n","o","p","q"]})",
       400, "stop", "17 stop strings; the limit is 16"},
      {R"({"prompt": [5], "stop": 3})", 400, "stop", "a string or a list"},
      {R"({"prompt": [5], "bogus": 1})", 400, "bogus", "unknown field 'bogus'"},
      {R"({"prompt": [5], "stream": "yes"})", 400, "stream", "must be a boolean"},
      {R"({"prompt": {"a": 1}})", 400, "prompt", "must be a string, a list"},
      {R"([1, 2])", 400, "", "must be a JSON object"},
  };
  for (const auto& k : cases) {
    auto j = ParseJsonBody(k.body, 32);
    ASSERT_TRUE(std::holds_alternative<RequestJson>(j)) << k.body;
    auto r = ParseCompletions(std::get<RequestJson>(j), facts);
    ASSERT_TRUE(std::holds_alternative<ApiError>(r)) << k.body;
    const ApiError& e = std::get<ApiError>(r);
    EXPECT_EQ(e.http_status, k.status) << k.body;
    EXPECT_EQ(e.param, k.param) << k.body;
    EXPECT_NE(e.message.find(k.message), std::string::npos) << k.body << " -> " << e.message;
  }
  // Unknown fields are ignored unless strict.
  facts.limits.strict_fields = false;
  auto ok = ParseCompletions(json::parse(R"({"prompt": [5], "bogus": 1, "max_tokens": 3})"), facts);
  ASSERT_TRUE(std::holds_alternative<ParsedRequest>(ok));
  EXPECT_EQ(std::get<ParsedRequest>(ok).gen.max_tokens, 3);
}

// By default a field the server does not honour is refused by name (OpenAI's answer to an
// unrecognized argument), never ignored; fields harmless to ignore and nulls pass;
// --lenient-fields (strict_fields false) ignores them all.
TEST(RequestParserTest, UnsupportedFieldsAreRefusedByNameHarmlessOnesPass) {
  const ModelConfig c = Small();
  ModelFacts facts{&c, nullptr, "m", Limits{}};
  ASSERT_TRUE(facts.limits.strict_fields);  // the default
  // (tools are chat's: on completions they are unknown.)
  const std::vector<std::string> refused = {"tools", "tool_choice", "suffix",
                                            "chat_template_kwargs", "frobnicate"};
  for (const std::string& field : refused) {
    json body = {{"prompt", {5}}, {"max_tokens", 2}};
    body[field] = json{{"x", 1}};
    auto r = ParseCompletions(body, facts);
    ASSERT_TRUE(std::holds_alternative<ApiError>(r)) << field;
    const ApiError& e = std::get<ApiError>(r);
    EXPECT_EQ(e.http_status, 400);
    EXPECT_EQ(e.param, field);
    EXPECT_EQ(e.code, "unsupported_field");
    EXPECT_NE(e.message.find("unknown field '" + field + "'"), std::string::npos) << e.message;
  }
  json harmless = {{"prompt", {5}},          {"user", "u-1"},       {"metadata", {{"k", "v"}}},
                   {"store", false},         {"service_tier", "auto"}, {"logit_bias", nullptr},
                   {"stream_options", nullptr}};
  EXPECT_TRUE(std::holds_alternative<ParsedRequest>(ParseCompletions(harmless, facts)));
  json stream = {{"prompt", {5}}, {"stream", true},
                 {"stream_options", {{"include_usage", true}, {"continuous_usage_stats", true}}}};
  auto s = ParseCompletions(stream, facts);
  ASSERT_TRUE(std::holds_alternative<ParsedRequest>(s));
  EXPECT_TRUE(std::get<ParsedRequest>(s).gen.continuous_usage);
  facts.limits.strict_fields = false;
  EXPECT_TRUE(std::holds_alternative<ParsedRequest>(
      ParseCompletions(json{{"prompt", {5}}, {"tools", json::array()}}, facts)));
}

TEST(RequestParserTest, MalformedJsonDeepNestingAndBadUtf8) {
  auto expect = [](const std::string& body, const std::string& code) {
    auto r = ParseJsonBody(body, 8);
    ASSERT_TRUE(std::holds_alternative<ApiError>(r)) << body;
    EXPECT_EQ(std::get<ApiError>(r).code, code) << body << " -> " << std::get<ApiError>(r).message;
    EXPECT_EQ(std::get<ApiError>(r).http_status, 400);
  };
  expect(R"({"prompt": [1, 2)", "invalid_json");  // truncated
  expect("{prompt: 1}", "invalid_json");
  expect("", "");
  expect(std::string(9, '[') + std::string(9, ']'), "json_too_deep");
  expect("{\"prompt\": \"\xff\xfe\"}", "invalid_utf8");
  expect("{\"prompt\": NaN}", "invalid_json");
  expect("{\"temperature\": 1e999}", "invalid_json");  // beyond a double
  EXPECT_TRUE(
      std::holds_alternative<RequestJson>(ParseJsonBody(std::string(8, '[') + std::string(8, ']'), 8)));
}

TEST(RequestParserTest, ClassifyAndChatNeedTheRightModel) {
  const ModelConfig lm = Small(), cls = Small(Architecture::kSequenceClassification);
  ModelFacts lm_facts{&lm, nullptr, "m", Limits{}}, cls_facts{&cls, nullptr, "m", Limits{}};
  auto a = ParseClassify(json::parse(R"({"input": [3, 4]})"), lm_facts);
  ASSERT_TRUE(std::holds_alternative<ApiError>(a));
  EXPECT_NE(std::get<ApiError>(a).message.find("no classification head"), std::string::npos);
  auto b = ParseCompletions(json::parse(R"({"prompt": [3]})"), cls_facts);
  ASSERT_TRUE(std::holds_alternative<ApiError>(b));
  EXPECT_NE(std::get<ApiError>(b).message.find("is a classifier"), std::string::npos);
  auto c = ParseClassify(json::parse(R"({"input": [[3, 4], [5]]})"), cls_facts);
  ASSERT_TRUE(std::holds_alternative<ParsedRequest>(c));
  EXPECT_EQ(std::get<ParsedRequest>(c).prompts.size(), 2u);
  auto d = ParseChat(json::parse(R"({"messages": [{"role": "user", "content": "hi"}]})"), lm_facts);
  ASSERT_TRUE(std::holds_alternative<ApiError>(d));
  EXPECT_NE(std::get<ApiError>(d).message.find("tokenizer"), std::string::npos);
}

// ---- stop strings and logits processing ----

TEST(TextOutputTest, StopStringsAreCutAndHeldBackAcrossPieces) {
  TextOutput t(nullptr, {"END", "xy"});
  auto a = t.Feed("hello E");  // "E" may start "END": held back
  EXPECT_EQ(a.text, "hello ");
  EXPECT_FALSE(a.hit_stop);
  auto b = t.Feed("Nx");  // "EN" still a prefix of END; "x" a prefix of "xy"... "ENx" is not
  EXPECT_EQ(b.text, "EN");
  auto c = t.Feed("yz");  // "xy" completes: cut before it, the rest dropped
  EXPECT_EQ(c.text, "");
  EXPECT_TRUE(c.hit_stop);
  TextOutput u(nullptr, {"END"});
  EXPECT_EQ(u.Feed("a stop at EN").text, "a stop at ");
  auto tail = u.Finish();  // the choice ended for another reason: what was held back is released
  ASSERT_TRUE(tail.ok());
  EXPECT_EQ(*tail, "EN");
  TextOutput none(nullptr, {});
  auto p = none.Push(5);  // no tokenizer: ids only, no text
  ASSERT_TRUE(p.ok());
  EXPECT_TRUE(p->text.empty());
}

TEST(LogitsProcessingTest, PenaltiesMinPAndLogprobsFollowTheirDefinitions) {
  GenerationOptions g;
  g.repetition_penalty = 2;
  g.frequency_penalty = 0.5f;
  g.presence_penalty = 0.25f;
  std::vector<float> v = {4, -4, 1, 1};
  ApplyPenalties(v, g, /*prompt=*/{0}, TokenCounts{{1, 2}});
  EXPECT_FLOAT_EQ(v[0], 2);                      // prompt token: 4 / 2
  EXPECT_FLOAT_EQ(v[1], -8 - 2 * 0.5f - 0.25f);  // output token twice: -4 * 2 - 1 - 0.25
  EXPECT_FLOAT_EQ(v[2], 1);                      // untouched
  std::vector<float> m = {0, std::log(0.5f), std::log(0.05f)};
  ApplyMinP(m, 0.1f, 1.0f);  // keeps p >= 0.1 * p_max
  EXPECT_TRUE(std::isfinite(m[1]));
  EXPECT_TRUE(std::isinf(m[2]));
  const std::vector<float> row = {1, 2, 3};
  const TokenLogprobs lp = Logprobs(row, 0, 2);
  const float z = std::log(std::exp(1.f) + std::exp(2.f) + std::exp(3.f));
  EXPECT_NEAR(lp.chosen, 1 - z, 1e-6);
  ASSERT_EQ(lp.top.size(), 2u);
  EXPECT_EQ(lp.top[0].first, 2);
  EXPECT_NEAR(lp.top[1].second, 2 - z, 1e-6);
}

// bad_words: a one-token word is always banned; a longer word's last token only where the output
// ends with the rest of it. Rank counts the tokens more likely than the chosen one.
TEST(LogitsProcessingTest, BadWordsBanTheTokenThatWouldCompleteAWord) {
  GenerationOptions g;
  g.bad_words = {{7}, {3, 4, 5}};
  auto ruled = [&](std::vector<int32_t> generated) {
    std::vector<float> v(10, 0.0f);
    ApplyTokenRules(v, g, generated, {1});
    return v;
  };
  EXPECT_TRUE(std::isinf(ruled({})[7]));
  EXPECT_FALSE(std::isinf(ruled({})[5]));
  EXPECT_FALSE(std::isinf(ruled({3})[5]));
  EXPECT_TRUE(std::isinf(ruled({9, 3, 4})[5]));
  EXPECT_FALSE(std::isinf(ruled({3, 4, 9})[5]));
  const std::vector<float> row = {1, 3, 2, 3};
  EXPECT_EQ(Logprobs(row, 2, 0).rank, 3);
  EXPECT_EQ(Logprobs(row, 1, 0).rank, 1);
}

// On Gemma's vocabulary: each word alone and after a space, as vLLM encodes them.
TEST(LogitsProcessingTest, BadWordSequencesOnGemmasVocabulary) {
  const auto path = std::filesystem::path(GEMMA2_SOURCE_DIR) / "../shared/tokenizers/gemma2-tokenizer.model";
  if (!std::filesystem::exists(path)) GTEST_SKIP() << "skipped: ../shared/tokenizers is absent";
  auto tok = Tokenizer::Load(path);
  ASSERT_TRUE(tok.ok());
  const auto words = BadWordSequences({"hello", " world"}, **tok);
  const auto enc = [&](const std::string& s) { return *(*tok)->Encode(s, false); };
  std::vector<std::vector<int32_t>> want = {enc("hello")};
  if (enc(" hello").size() == enc("hello").size()) want.push_back(enc(" hello"));
  want.push_back(enc("world"));
  if (enc(" world").size() == enc("world").size()) want.push_back(enc(" world"));
  EXPECT_EQ(words, want);
  EXPECT_GE(words.size(), 3u);
}

// ---- structured output and tool calls in requests ----

std::unique_ptr<Tokenizer> GemmaTokenizer() {
  const auto path = std::filesystem::path(GEMMA2_SOURCE_DIR) / "../shared/tokenizers/gemma2-tokenizer.model";
  if (!std::filesystem::exists(path)) return nullptr;
  auto tok = Tokenizer::Load(path);
  return tok.ok() ? std::move(tok).value() : nullptr;
}

// Every way of asking for structure compiles once per specification (the cache), and each
// misuse is a 400 naming its field.
TEST(RequestParserTest, StructuredOutputFieldsAndTheirErrors) {
  auto tok = GemmaTokenizer();
  if (!tok) GTEST_SKIP() << "skipped: ../shared/tokenizers is absent";
  ModelConfig c = Small();
  c.vocab_size = tok->vocab_size();
  ModelFacts facts{&c, tok.get(), "m", Limits{}};
  facts.constraints = std::make_shared<ConstraintCache>(*tok, std::vector<int32_t>{1}, 2);
  const json schema = {{"type", "object"}, {"properties", {{"a", {{"type", "integer"}}}}}};
  const std::vector<std::pair<json, std::string>> asks = {
      {{{"response_format", {{"type", "json_object"}}}}, "json_object"},
      {{{"response_format", {{"type", "json_schema"}, {"json_schema", {{"name", "n"}, {"schema", schema}}}}}}, "json_schema"},
      {{{"structured_outputs", {{"json", schema}}}}, "json_schema"},
      {{{"guided_json", schema.dump()}}, "json_schema"},
      {{{"structured_outputs", {{"regex", "[a-c]+"}}}}, "regex"},
      {{{"guided_choice", {"x", "y"}}}, "choice"},
      {{{"response_format", {{"type", "text"}}}}, ""},
  };
  for (const auto& [fields, kind] : asks) {
    json body = {{"prompt", {5}}};
    body.update(fields);
    auto r = ParseCompletions(body, facts);
    ASSERT_TRUE(std::holds_alternative<ParsedRequest>(r)) << body << " -> " << std::get<ApiError>(r).message;
    const auto& constraint = std::get<ParsedRequest>(r).gen.constraint;
    EXPECT_EQ(constraint ? constraint->kind : "", kind) << body;
    EXPECT_FALSE(std::get<ParsedRequest>(r).gen.needs_logits());  // masks go to the ranks
  }
  EXPECT_EQ(facts.constraints->size(), 2u);  // least recently used out past the capacity
  const std::vector<std::tuple<json, std::string, std::string>> bad = {
      {{{"response_format", {{"type", "grammar"}}}}, "response_format", "'grammar' is not supported"},
      {{{"response_format", {{"type", "json_schema"}, {"json_schema", {{"schema", {{"type", "string"}, {"format", "uri"}}}}}}}},
       "response_format", "keyword 'format'"},
      {{{"guided_json", "{not json"}}, "guided_json", "must be a JSON Schema"},
      {{{"structured_outputs", {{"grammar", "root ::= x"}}}}, "structured_outputs", "not supported"},
      {{{"structured_outputs", {{"regex", "a"}, {"choice", {"a"}}}}}, "structured_outputs", "two structures"},
      {{{"guided_regex", "a"}, {"response_format", {{"type", "json_object"}}}}, "guided_regex", "both ask"},
      {{{"guided_choice", json::array()}}, "guided_choice", "non-empty"},
      {{{"guided_regex", "a{5,2}"}}, "guided_regex", "m < n"},
      // JSON inside a string nests no deeper than the body may (a deep one would crash the parser).
      {{{"guided_json", std::string(100000, '[') + std::string(100000, ']')}}, "guided_json", "deeper than 32"},
  };
  for (const auto& [fields, param, message] : bad) {
    json body = {{"prompt", {5}}};
    body.update(fields);
    auto r = ParseCompletions(body, facts);
    ASSERT_TRUE(std::holds_alternative<ApiError>(r)) << body;
    const ApiError& e = std::get<ApiError>(r);
    EXPECT_EQ(e.http_status, 400);
    EXPECT_EQ(e.param, param) << body << " -> " << e.message;
    EXPECT_NE(e.message.find(message), std::string::npos) << body << " -> " << e.message;
  }
  ModelFacts no_tokenizer{&c, nullptr, "m", Limits{}};
  auto r = ParseCompletions(json{{"prompt", {5}}, {"guided_regex", "a"}}, no_tokenizer);
  ASSERT_TRUE(std::holds_alternative<ApiError>(r));
  EXPECT_NE(std::get<ApiError>(r).message.find("tokenizer"), std::string::npos);
}

// Tools open the conversation; an assistant's calls and the tool's results are turns of it, in the
// documented format; required and named choices are constrained, auto is not.
TEST(RequestParserTest, ToolsRenderIntoTheChatAndChoicesConstrain) {
  auto tok = GemmaTokenizer();
  if (!tok) GTEST_SKIP() << "skipped: ../shared/tokenizers is absent";
  ModelConfig c = Small();
  c.vocab_size = tok->vocab_size();
  c.max_position_embeddings = 8192;
  ModelFacts facts{&c, tok.get(), "m", Limits{}};
  facts.constraints = std::make_shared<ConstraintCache>(*tok, std::vector<int32_t>{1});
  const json tools = json::parse(R"([{"type":"function","function":{"name":"get_weather",
      "description":"Weather in a city","parameters":{"type":"object","properties":{"city":{"type":"string"}},
      "required":["city"]}}},{"type":"function","function":{"name":"now"}}])");
  const json messages = json::parse(R"([{"role":"system","content":"Be brief."},
      {"role":"user","content":"Weather in Oslo?"},
      {"role":"assistant","content":null,"tool_calls":[{"id":"call_1","type":"function",
        "function":{"name":"get_weather","arguments":"{\"city\":\"Oslo\"}"}}]},
      {"role":"tool","tool_call_id":"call_1","content":"12 C"},
      {"role":"user","content":"And now?"}])");
  auto r = ParseChat(json{{"messages", messages}, {"tools", tools}}, facts);
  ASSERT_TRUE(std::holds_alternative<ParsedRequest>(r)) << std::get<ApiError>(r).message;
  const ParsedRequest& p = std::get<ParsedRequest>(r);
  EXPECT_EQ(p.tools.choice, ToolUse::Choice::kAuto);
  EXPECT_FALSE(p.gen.constraint);
  const std::string text = *tok->Decode(p.prompts[0], /*skip_special=*/false);
  for (const char* want :
       {"<start_of_turn>user\nBe brief.\n\nYou can call these functions", "\"name\":\"get_weather\"",
        "<start_of_turn>model\n{\"name\":\"get_weather\",\"arguments\":{\"city\":\"Oslo\"}}<end_of_turn>",
        "<start_of_turn>user\nResult of get_weather (call call_1):\n12 C\n\nAnd now?<end_of_turn>"}) {
    EXPECT_NE(text.find(want), std::string::npos) << want << "\nin\n" << text;
  }
  for (const json& choice : {json("required"), json{{"type", "function"}, {"function", {{"name", "now"}}}}}) {
    auto forced = ParseChat(json{{"messages", {messages[1]}}, {"tools", tools}, {"tool_choice", choice}}, facts);
    ASSERT_TRUE(std::holds_alternative<ParsedRequest>(forced)) << std::get<ApiError>(forced).message;
    ASSERT_TRUE(std::get<ParsedRequest>(forced).gen.constraint);
    EXPECT_EQ(std::get<ParsedRequest>(forced).gen.constraint->kind, "tool_calls");
  }
  auto none = ParseChat(json{{"messages", {messages[1]}}, {"tools", tools}, {"tool_choice", "none"}}, facts);
  ASSERT_TRUE(std::holds_alternative<ParsedRequest>(none));
  EXPECT_FALSE(std::get<ParsedRequest>(none).tools.parses());
  EXPECT_EQ(tok->Decode(std::get<ParsedRequest>(none).prompts[0])->find("You can call"), std::string::npos);

  const std::vector<std::pair<json, std::string>> bad = {
      {{{"tools", json::parse(R"([{"type":"function","function":{"name":"a b"}}])")}}, "'name' must be"},
      {{{"tools", json::parse(R"([{"type":"function","function":{"name":"a"}},{"type":"function","function":{"name":"a"}}])")}}, "offered twice"},
      {{{"tools", tools}, {"tool_choice", {{"type", "function"}, {"function", {{"name", "other"}}}}}}, "not among"},
      {{{"tool_choice", "required"}}, "offers none"},
      {{{"tools", tools}, {"tool_choice", "sometimes"}}, "must be none, auto, required"},
      {{{"tools", tools}, {"tool_choice", "required"}, {"response_format", {{"type", "json_object"}}}}, "give one"},
      {{{"tools", json::parse(R"([{"type":"function","function":{"name":"a","parameters":{"type":"string","format":"x"}}}])")},
        {"tool_choice", "required"}}, "keyword 'format'"},
  };
  for (const auto& [fields, message] : bad) {
    json body = {{"messages", {messages[1]}}};
    body.update(fields);
    auto e = ParseChat(body, facts);
    ASSERT_TRUE(std::holds_alternative<ApiError>(e)) << body;
    EXPECT_NE(std::get<ApiError>(e).message.find(message), std::string::npos)
        << body << " -> " << std::get<ApiError>(e).message;
  }
}

// A server that answers each connection with the next canned bytes and closes it: what a hostile
// or broken OpenAI-compatible server may send a client.
class CannedServer {
 public:
  explicit CannedServer(std::vector<std::string> answers) : answers_(std::move(answers)) {
    fd_ = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    EXPECT_EQ(bind(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
    socklen_t len = sizeof(addr);
    getsockname(fd_, reinterpret_cast<sockaddr*>(&addr), &len);
    port_ = ntohs(addr.sin_port);
    listen(fd_, 8);
    thread_ = std::thread([this] {
      for (const std::string& answer : answers_) {
        const int c = accept(fd_, nullptr, nullptr);
        if (c < 0) return;
        std::string request;
        char buf[4096];
        while (request.find("\r\n\r\n") == std::string::npos) {  // the headers (bodies are small)
          const ssize_t got = read(c, buf, sizeof(buf));
          if (got <= 0) break;
          request.append(buf, static_cast<size_t>(got));
        }
        for (size_t sent = 0; sent < answer.size();) {
          const ssize_t put = write(c, answer.data() + sent, answer.size() - sent);
          if (put <= 0) break;
          sent += static_cast<size_t>(put);
        }
        close(c);
      }
    });
  }
  ~CannedServer() {
    shutdown(fd_, SHUT_RDWR);
    close(fd_);
    thread_.join();
  }
  std::string url() const { return "http://127.0.0.1:" + std::to_string(port_); }
  static std::string Json(const std::string& body) {
    return "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: " +
           std::to_string(body.size()) + "\r\nConnection: close\r\n\r\n" + body;
  }
  static std::string Events(const std::vector<std::string>& data) {
    std::string out =
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n";
    for (const std::string& d : data) out += "data: " + d + "\n\n";
    return out;
  }

 private:
  std::vector<std::string> answers_;
  int fd_ = -1, port_ = 0;
  std::thread thread_;
};

// The client side (gemma2-client, gemma2-serve-bench) against answers of every wrong shape: 2 MB
// of brackets, a choice index of 10^9, content that is not a string, a usage count that is not a
// number: each call returns (an error where the stream broke), nothing crashes or allocates
// without bound.
TEST(TimedCallTest, HostileAnswersEndTheCallNotTheClient) {
  const std::string deep = std::string(1 << 20, '[') + std::string(1 << 20, ']');
  CannedServer server(
      {CannedServer::Json(deep),
       CannedServer::Events({R"({"choices":[{"index":1000000000,"text":"x"}]})", "[DONE]"}),
       CannedServer::Events({R"({"choices":[{"index":0,"delta":{"content":5}}]})", "[DONE]"}),
       CannedServer::Events({deep, R"({"choices":[{"index":0,"text":"ok"}]})", "[DONE]"}),
       CannedServer::Json(R"({"choices":[],"usage":{"completion_tokens":"many"}})"),
       CannedServer::Json(deep)});
  auto url = ParseUrl(server.url());
  ASSERT_TRUE(url.ok());
  HttpCall call;
  call.path = "/v1/completions";
  call.body = "{}";
  call.timeout = std::chrono::milliseconds(10000);
  TimedAnswer a = CallTimed(*url, call, /*stream=*/false, /*chat=*/false);
  ASSERT_TRUE(a.http.ok());
  EXPECT_TRUE(a.response.is_string());  // not JSON as far as the client goes: kept as text
  a = CallTimed(*url, call, /*stream=*/true, /*chat=*/false);
  EXPECT_FALSE(a.ok);
  EXPECT_NE(a.response.dump().find("malformed chunk"), std::string::npos) << a.response.dump();
  a = CallTimed(*url, call, /*stream=*/true, /*chat=*/true);
  EXPECT_FALSE(a.ok);
  a = CallTimed(*url, call, /*stream=*/true, /*chat=*/false);
  EXPECT_TRUE(a.ok);  // the deep event is skipped, the next one counts
  EXPECT_EQ(a.response["choices"][0]["text"], "ok");
  a = CallTimed(*url, call, /*stream=*/false, /*chat=*/false);
  EXPECT_TRUE(a.ok);
  EXPECT_EQ(a.completion_tokens, 0);
  // gemma2-client asking the deep server for its model name: an error line, exit 1.
  int code = 0;
  FILE* p = popen((std::string(GEMMA2_BINARY_DIR) + "/bin/gemma2-client --url " + server.url() +
                   " --input /dev/null 2>&1")
                      .c_str(),
                  "r");
  std::string out;
  char buf[4096];
  for (size_t got; (got = fread(buf, 1, sizeof(buf), p)) > 0;) out.append(buf, got);
  code = pclose(p);
  EXPECT_NE(code, 0);
  EXPECT_NE(out.find("/v1/models"), std::string::npos) << out.substr(0, 500);
  EXPECT_LT(out.size(), 2000u);  // the answer's 2 MB are not echoed
  // gemma2-serve-bench against errors whose bodies are not UTF-8: the run ends naming the failed
  // requests and the status, and still writes its JSON.
  const std::string bad_body = "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n"
                               "Connection: close\r\n\r\n\xff\xfe\xfd\xfc";
  CannedServer failing({bad_body, bad_body, bad_body});
  const std::string json_out = ::testing::TempDir() + "/serve_bench_fail.json";
  p = popen((std::string(GEMMA2_BINARY_DIR) + "/bin/gemma2-serve-bench --url " + failing.url() +
             " --num-prompts 2 --warmup 0 --concurrency 1 --input-len 4 --output-len 2"
             " --vocab-size 100 --out " + json_out + " 2>&1")
                .c_str(),
            "r");
  out.clear();
  for (size_t got; (got = fread(buf, 1, sizeof(buf), p)) > 0;) out.append(buf, got);
  code = pclose(p);
  EXPECT_NE(code, 0);
  EXPECT_NE(out.find("2 requests failed"), std::string::npos) << out;
  EXPECT_NE(out.find("500"), std::string::npos) << out;
  std::ifstream written(json_out);
  EXPECT_FALSE(json::parse(written, nullptr, false).is_discarded());
}

// The HTTP session's wake-up: a notify whose cancel ran while the session was busy elsewhere (a
// stream's write; here a yield to the io loop) still ends the next wait at once; a notify from
// another thread ends a wait; with none, a wait lasts its poll.
TEST(SessionWakerTest, ANotifyWhileTheSessionIsBusyIsNotLost) {
  namespace asio = boost::asio;
  using Ms = std::chrono::duration<double, std::milli>;
  asio::io_context ioc;
  auto waker = std::make_shared<SessionWaker>(ioc);
  double busy_ms = -1, notified_ms = -1, idle_ms = -1;
  std::thread notifier;
  asio::co_spawn(
      ioc,
      [&]() -> asio::awaitable<void> {
        waker->Notify();
        co_await asio::post(ioc.get_executor(), asio::use_awaitable);  // its cancel runs now
        auto t0 = std::chrono::steady_clock::now();
        co_await waker->Wait(std::chrono::milliseconds(2000));
        busy_ms = Ms(std::chrono::steady_clock::now() - t0).count();
        notifier = std::thread([w = waker] {
          std::this_thread::sleep_for(std::chrono::milliseconds(30));
          w->Notify();
        });
        t0 = std::chrono::steady_clock::now();
        co_await waker->Wait(std::chrono::milliseconds(2000));
        notified_ms = Ms(std::chrono::steady_clock::now() - t0).count();
        t0 = std::chrono::steady_clock::now();
        co_await waker->Wait(std::chrono::milliseconds(100));
        idle_ms = Ms(std::chrono::steady_clock::now() - t0).count();
      },
      asio::detached);
  ioc.run();
  notifier.join();
  EXPECT_LT(busy_ms, 100) << "the notify was lost: the wait lasted its poll";
  EXPECT_GE(notified_ms, 20);
  EXPECT_LT(notified_ms, 1000);
  EXPECT_GE(idle_ms, 90);
}

// A forced call streamed: fed the text in pieces of every size, the deltas open each call once
// (index, id, type, name; arguments "") and then carry its arguments' text, which put together is
// the text the model wrote (brackets and braces inside strings included) and what ParseToolCalls
// returns; text of another form stops the stream.
TEST(ToolCallsTest, StreamedCallsAreTheWrittenCallsInPieces) {
  const std::string a0 = R"({"city":"Paris \"north\" }","days":[1,{"x":"]}"}],"n":null})";
  const std::string text =
      R"([{"name":"get_weather","arguments":)" + a0 + R"(},{"name":"f","arguments":{}}])";
  for (size_t piece = 1; piece <= 9; ++piece) {
    ToolCallStream stream;
    std::vector<json> deltas;
    for (size_t end = piece; end < text.size() + piece; end += piece) {
      for (const json& d :
           stream.Feed(std::string_view(text).substr(0, std::min(end, text.size()))))
        deltas.push_back(d);
    }
    ASSERT_FALSE(stream.broken());
    std::map<int, std::string> args;
    std::vector<json> openings;
    for (const json& d : deltas) {
      if (d.contains("id")) {
        openings.push_back(d);
        EXPECT_EQ(d["function"]["arguments"], "");
      } else {
        EXPECT_EQ(d.size(), 2u) << d;  // index and the fragment
      }
      args[d["index"].get<int>()] += d["function"]["arguments"].get<std::string>();
    }
    ASSERT_EQ(openings.size(), 2u) << piece;
    EXPECT_EQ(openings[0]["index"], 0);
    EXPECT_EQ(openings[0]["type"], "function");
    EXPECT_EQ(openings[0]["function"]["name"], "get_weather");
    EXPECT_EQ(openings[1]["function"]["name"], "f");
    EXPECT_NE(openings[0]["id"], openings[1]["id"]);
    EXPECT_EQ(args[0], a0) << piece;
    EXPECT_EQ(args[1], "{}");
    if (piece == 1) {
      EXPECT_GT(deltas.size(), 10u);  // fragments, not one piece
    }
  }
  const json parsed = ParseToolCalls(text, {"get_weather", "f"});
  ASSERT_EQ(parsed.size(), 2u);
  EXPECT_EQ(parsed[0]["function"]["arguments"], a0);
  ToolCallStream one;
  EXPECT_EQ(one.Feed(R"({"name":"f","arguments":{"a":1}} )").size(), 2u);
  EXPECT_FALSE(one.broken());
  for (const char* other : {"hello", R"({"nam":"f"})", R"([{"name":"f","arguments":{}};)"}) {
    ToolCallStream s2;
    s2.Feed(other);
    EXPECT_TRUE(s2.broken()) << other;
  }
  ToolCallStream long_name;
  long_name.Feed(R"({"name":")" + std::string(200, 'x'));
  EXPECT_TRUE(long_name.broken());
}

TEST(ToolCallsTest, RepliesThatAreCallsAndRepliesThatAreNot) {
  const std::vector<std::string> names = {"f", "g"};
  const json one = ParseToolCalls(R"( {"name":"f","arguments":{"b":1,"a":[2]}})", names);
  ASSERT_EQ(one.size(), 1u) << one;
  EXPECT_EQ(one[0]["type"], "function");
  EXPECT_EQ(one[0]["function"]["name"], "f");
  EXPECT_EQ(one[0]["function"]["arguments"], R"({"b":1,"a":[2]})");  // as written, in order
  EXPECT_EQ(one[0]["id"].get<std::string>().rfind("call_", 0), 0u);
  const json two = ParseToolCalls(R"([{"name":"f","arguments":{}},{"name":"g"}])", names);
  ASSERT_EQ(two.size(), 2u);
  EXPECT_NE(two[0]["id"], two[1]["id"]);
  EXPECT_EQ(two[1]["function"]["arguments"], "{}");
  for (const char* no : {"hello", R"({"name":"h","arguments":{}})", R"({"name":"f","arguments":3})",
                         R"({"name":"f","extra":1})", "[]", R"({"name":"f")", ""})
    EXPECT_TRUE(ParseToolCalls(no, names).is_null()) << no;
  // A reply nested past the bound is not calls (and does not exhaust the stack).
  const std::string deep = R"({"name":"f","arguments":{"a":)" + std::string(200000, '[') +
                           std::string(200000, ']') + "}}";
  EXPECT_TRUE(ParseToolCalls(deep, names).is_null());
  std::map<std::string, std::string> ids;
  auto kept = RenderCalls(nlohmann::ordered_json::parse(
                              R"([{"id":"c","function":{"name":"f","arguments":")" +
                              std::string(200000, '[') + R"("}}])"),
                          ids);
  ASSERT_TRUE(std::holds_alternative<std::string>(kept));
  EXPECT_NE(std::get<std::string>(kept).find("\"arguments\":\"[[["), std::string::npos);
}

// ---- the scheduler against Generate ----

class SchedulerTest : public ::testing::Test {
 protected:
  void SharedPrefixCase(const ModelConfig& c);
  void Make(const ModelConfig& c) {
    RandomCheckpointOptions o;
    o.seed = 5;
    o.weight_std = 0.3f;
    engine_.reset();
    ck_.reset();
    dir_ = std::make_unique<testing::TempDir>();
    ASSERT_TRUE(WriteRandomCheckpoint(c, dir_->path(), o).ok());
    auto ck = Checkpoint::Open(dir_->path());
    ASSERT_TRUE(ck.ok()) << ck.status().ToString();
    ck_ = std::move(ck).value();
    EngineOptions eo{{"cpu"}, 2, 1};
    eo.kv_block_size = 4;
    auto e = Engine::Create(*ck_, eo);
    ASSERT_TRUE(e.ok()) << e.status().ToString();
    engine_ = std::move(e).value();
  }
  std::shared_ptr<RequestHandle> Submit(Scheduler& s, ParsedRequest r) {
    auto h = std::make_shared<RequestHandle>("t", std::move(r));
    EXPECT_FALSE(s.Submit(h).has_value());
    return h;
  }
  static void WaitDone(RequestHandle& h) {
    for (int i = 0; i < 20000; ++i) {
      {
        MutexLock lock(h.mu);
        if (h.done) return;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    FAIL() << "request did not finish";
  }
  // Submits `reqs` together, waits for each, and compares its tokens with `expected`.
  void ExpectTokens(Scheduler& s, const std::vector<ParsedRequest>& reqs,
                    const std::vector<std::vector<int32_t>>& expected, const std::string& what) {
    std::vector<std::shared_ptr<RequestHandle>> hs;
    for (const auto& r : reqs) hs.push_back(Submit(s, r));
    for (size_t i = 0; i < hs.size(); ++i) {
      WaitDone(*hs[i]);
      MutexLock lock(hs[i]->mu);
      ASSERT_FALSE(hs[i]->error) << hs[i]->error->message;
      EXPECT_EQ(hs[i]->choices[0].token_ids, expected[i]) << what << " " << i;
    }
  }
  std::unique_ptr<testing::TempDir> dir_;
  std::unique_ptr<Checkpoint> ck_;
  std::unique_ptr<Engine> engine_;
  Metrics metrics_;
};

ParsedRequest Completion(std::vector<int32_t> prompt, int64_t max_tokens, float temperature = 0,
                         std::optional<uint64_t> seed = std::nullopt) {
  ParsedRequest r;
  r.prompts = {std::move(prompt)};
  r.gen.max_tokens = max_tokens;
  r.gen.temperature = temperature;
  r.gen.seed = seed;
  r.gen.ignore_eos = true;
  return r;
}

std::vector<int32_t> Prompt(int n, int salt) {
  std::vector<int32_t> p;
  for (int i = 0; i < n; ++i) p.push_back(static_cast<int32_t>(2 + (i * 7 + salt * 13) % 90));
  return p;
}

// Gauges are published once per scheduler round, so a request can be seen done a moment before
// the gauges that include it: wait (bounded) for a gauge to reach `want`.
int64_t Settled(const std::atomic<int64_t>& gauge, int64_t want) {
  for (int i = 0; i < 2000 && gauge.load() != want; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  return gauge.load();
}

// What the offline loop (Generate, one request at a time) produces for each request.
std::vector<std::vector<int32_t>> Offline(StepExecutor& e, const std::vector<ParsedRequest>& rs) {
  std::vector<std::vector<int32_t>> want;
  for (const auto& r : rs) {
    GenerationRequest g;
    g.prompt = r.prompts[0];
    g.max_new_tokens = r.gen.max_tokens;
    g.sampling = r.gen.Sampling(0);
    g.ignore_eos = true;
    auto out = Generate(e, {g});
    EXPECT_TRUE(out.ok()) << out.status().ToString();
    want.push_back(out.ok() ? (*out)[0].generated : std::vector<int32_t>{});
  }
  return want;
}

// Chunked prefill, a batch that changes every step, and preemption under a tiny KV budget all give
// the tokens of the offline loop (greedy and seeded sampling).
TEST_F(SchedulerTest, ContinuousBatchingEqualsTheOfflineLoop) {
  Make(Small());
  std::vector<ParsedRequest> reqs;
  for (int i = 0; i < 6; ++i) {
    reqs.push_back(Completion(Prompt(5 + 9 * i, i), 6 + 3 * i, i % 2 ? 0.8f : 0.0f, 100 + i));
  }
  const auto expected = Offline(*engine_, reqs);
  struct Setting {
    int64_t step_tokens, kv_blocks;
  };
  // 40 blocks of 4 (two per 4 positions: the full and the sliding-window layers): each request
  // fits alone (at most 71 tokens), all six together do not.
  for (const Setting& st : {Setting{256, 4096}, Setting{7, 4096}, Setting{16, 40}}) {
    Metrics metrics;
    SchedulerOptions o;
    o.max_step_tokens = st.step_tokens;
    o.kv_blocks = st.kv_blocks;
    Scheduler s(*engine_, nullptr, metrics, o);
    std::vector<std::shared_ptr<RequestHandle>> hs;
    for (size_t i = 0; i < reqs.size(); ++i) {
      hs.push_back(Submit(s, reqs[i]));
      std::this_thread::sleep_for(std::chrono::milliseconds(2));  // arrivals spread over steps
    }
    for (size_t i = 0; i < hs.size(); ++i) {
      WaitDone(*hs[i]);
      MutexLock lock(hs[i]->mu);
      ASSERT_FALSE(hs[i]->error) << hs[i]->error->message;
      EXPECT_EQ(hs[i]->choices[0].token_ids, expected[i])
          << "request " << i << " step tokens " << st.step_tokens;
      EXPECT_EQ(hs[i]->choices[0].finish_reason, "length");
    }

    EXPECT_EQ(metrics.outcomes[0].load(), reqs.size());
    EXPECT_EQ(Settled(metrics.kv_blocks_used, 0), 0);
  }
}

// An executor with a pipeline of `depth` steps, as the cluster has with several stages: a plan is
// checked when submitted (as the cluster checks it, against the lengths of the steps already
// collected) and runs when collected. Records how many plans were in flight at most and whether
// two in flight ever shared a sequence.
class PipelinedEngine final : public StepExecutor {
 public:
  PipelinedEngine(Engine& e, int depth) : e_(e), depth_(depth) {}
  const ModelConfig& config() const override { return e_.config(); }
  int64_t NewSequence() override { return e_.NewSequence(); }
  void ReleaseSequence(int64_t id) override { e_.ReleaseSequence(id); }
  int64_t SequenceLength(int64_t id) const override { return e_.SequenceLength(id); }
  const KvLayout& kv_layout() const override { return e_.kv_layout(); }
  int64_t kv_blocks() const override { return e_.kv_blocks(); }
  int64_t KvCopyFloor(int64_t id) const override { return e_.KvCopyFloor(id); }
  Result<StepOutput> Step(const StepPlan& plan) override { return e_.Step(plan); }
  int pipeline_depth() const override { return depth_; }
  Status Submit(const StepPlan& plan) override {
    std::map<int64_t, int64_t> lengths;
    auto know = [&](int64_t id) {
      if (const int64_t n = e_.SequenceLength(id); n >= 0) lengths[id] = n;
    };
    for (const auto& s : plan.sequences) {
      know(s.sequence_id);
      for (const StepPlan& other : queue_) {
        for (const auto& o : other.sequences) shared_ |= o.sequence_id == s.sequence_id;
      }
    }
    for (const KvCopy& k : plan.kv_copies) {
      know(k.src);
      know(k.dst);
    }
    RETURN_IF_ERROR(ValidateStep(e_.config(), lengths, plan));
    queue_.push_back(plan);
    most_ = std::max(most_, static_cast<int>(queue_.size()));
    return OkStatus();
  }
  Result<StepOutput> Collect() override {
    const StepPlan plan = std::move(queue_.front());
    queue_.pop_front();
    return e_.Step(plan);
  }
  int most_in_flight() const { return most_; }
  bool shared() const { return shared_; }

 private:
  Engine& e_;
  int depth_;
  std::deque<StepPlan> queue_;
  int most_ = 0;
  bool shared_ = false;
};

// Steps kept in flight two and three at a time over disjoint sequences (pipelined decode) give
// the offline loop's tokens, with prefill chunks, preemption and prefix copies in the mix (a
// window of 48, so finished prompts keep the sliding-window blocks a copy needs).
TEST_F(SchedulerTest, PipelinedStepsEqualTheOfflineLoop) {
  ModelConfig c = Small();
  c.sliding_window = 48;
  Make(c);
  std::vector<ParsedRequest> reqs;
  for (int i = 0; i < 8; ++i) {
    reqs.push_back(Completion(Prompt(5 + 7 * i, i % 5), 6 + 3 * i, i % 2 ? 0.8f : 0.0f, 200 + i));
  }
  // A second wave shares prompt prefixes with the finished first one: prefix copies travel with
  // pipelined steps.
  std::vector<ParsedRequest> wave2;
  for (int salt = 0; salt < 4; ++salt) wave2.push_back(Completion(Prompt(30, salt), 5, 0.0f));
  const auto expected = Offline(*engine_, reqs), expected2 = Offline(*engine_, wave2);
  for (int depth : {2, 3}) {
    for (int64_t kv_blocks : {4096, 48}) {  // 48 blocks of 4: preemptions
      SCOPED_TRACE("depth " + std::to_string(depth) + " blocks " + std::to_string(kv_blocks));
      PipelinedEngine pipe(*engine_, depth);
      Metrics metrics;
      SchedulerOptions o;
      o.max_step_tokens = 9;
      o.kv_blocks = kv_blocks;
      Scheduler s(pipe, nullptr, metrics, o);
      ExpectTokens(s, reqs, expected, "request");
      ExpectTokens(s, wave2, expected2, "second wave");
      EXPECT_EQ(pipe.most_in_flight(), depth);
      EXPECT_FALSE(pipe.shared());
      EXPECT_EQ(metrics.outcomes[0].load(), reqs.size() + wave2.size());
      EXPECT_EQ(Settled(metrics.kv_blocks_used, 0), 0);
      if (kv_blocks == 4096) {
        EXPECT_GT(metrics.prefix_hit_tokens.load(), 0u);  // the second wave reused the first's
      }
    }
  }
}

// Four sequences admitted together outgrow a 14-block budget: some are preempted, recomputed
// later, and still produce the offline loop's tokens.
// prompt_logprobs: each prompt token's log-probability and top k equal log_softmax of the offline
// loop's rows, whether the prompt is prefilled in one step or in chunks, for a repeated prompt
// (its cached prefix is not reused: every row is needed) and for several choices.
TEST_F(SchedulerTest, PromptLogprobsEqualTheOfflineRows) {
  Make(Small());
  const std::vector<int32_t> prompt = Prompt(20, 4);
  GenerationRequest g;
  g.prompt = prompt;
  g.max_new_tokens = 1;
  g.return_logits = true;
  auto offline = Generate(*engine_, {g});
  ASSERT_TRUE(offline.ok());
  const auto& rows = (*offline)[0].logits;
  ASSERT_GE(rows.size(), prompt.size());
  for (int64_t step_tokens : {256, 6}) {
    SchedulerOptions o;
    o.max_step_tokens = step_tokens;
    Scheduler s(*engine_, nullptr, metrics_, o);
    for (int repeat = 0; repeat < 2; ++repeat) {
      ParsedRequest r = Completion(prompt, 3);
      r.gen.prompt_logprobs = 3;
      r.gen.n = 2;
      auto h = Submit(s, r);
      WaitDone(*h);
      MutexLock lock(h->mu);
      ASSERT_FALSE(h->error);
      ASSERT_EQ(h->prompt_logprobs.size(), 1u);
      const auto& lps = h->prompt_logprobs[0];
      ASSERT_EQ(lps.size(), prompt.size() - 1) << step_tokens;
      for (size_t t = 0; t + 1 < prompt.size(); ++t) {
        const auto& row = rows[t];
        const float best = *std::max_element(row.begin(), row.end());
        double z = 0;
        for (float v : row) z += std::exp(static_cast<double>(v - best));
        const double log_z = best + std::log(z);
        EXPECT_NEAR(lps[t].chosen, row[static_cast<size_t>(prompt[t + 1])] - log_z, 1e-5) << t;
        ASSERT_EQ(lps[t].top.size(), 3u);
        EXPECT_NEAR(lps[t].top[0].second, best - log_z, 1e-5) << t;
        EXPECT_EQ(row[static_cast<size_t>(lps[t].top[0].first)], best);
        int64_t above = 0;
        for (float v : row) above += v > row[static_cast<size_t>(prompt[t + 1])];
        EXPECT_EQ(lps[t].rank, above + 1);
      }
      EXPECT_EQ(h->choices.size(), 2u);
      EXPECT_EQ(h->choices[0].token_ids.size(), 3u);
    }
  }
}

TEST_F(SchedulerTest, PreemptedSequencesAreRecomputedToTheSameTokens) {
  Make(Small());
  SchedulerOptions o;
  o.kv_blocks = 28;  // 56 positions (both layer groups); each request alone needs 40
  Scheduler s(*engine_, nullptr, metrics_, o);
  std::vector<std::shared_ptr<RequestHandle>> hs;
  for (int i = 0; i < 4; ++i) hs.push_back(Submit(s, Completion(Prompt(10, i), 30, 0.7f, 9 + i)));

  for (auto& h : hs) WaitDone(*h);  // the scheduler is idle before the test uses the engine
  for (int i = 0; i < 4; ++i) {
    GenerationRequest g;
    g.prompt = hs[i]->request().prompts[0];
    g.max_new_tokens = 30;
    g.sampling = hs[i]->request().gen.Sampling(0);
    g.ignore_eos = true;
    auto want = Generate(*engine_, {g});
    ASSERT_TRUE(want.ok());
    MutexLock lock(hs[i]->mu);
    EXPECT_EQ(hs[i]->choices[0].token_ids, (*want)[0].generated) << i;
  }
  EXPECT_GT(metrics_.preemptions.load(), 0u);
  EXPECT_EQ(Settled(metrics_.kv_blocks_used, 0), 0);
}

// A second request that shares a prompt prefix with a finished one copies the prefix's KV instead
// of computing it, and still gets the offline loop's tokens; with prefix caching off it computes.
// With a sliding window of 6 the finished sequence no longer holds the window of a 36-token
// prefix (its sliding-window blocks were given back): it is recomputed, to the same tokens.
TEST_F(SchedulerTest, SharedPrefixesAreCopiedNotRecomputed) {
  for (int64_t window : {48, 6}) {
    SCOPED_TRACE("window " + std::to_string(window));
    ModelConfig c = Small();
    c.sliding_window = window;
    SharedPrefixCase(c);
  }
}

void SchedulerTest::SharedPrefixCase(const ModelConfig& c) {
  Make(c);
  std::vector<int32_t> shared = Prompt(37, 4);
  std::vector<int32_t> second = shared;
  second.insert(second.end(), {5, 6, 7});
  GenerationRequest g;
  g.prompt = second;
  g.max_new_tokens = 8;
  g.ignore_eos = true;
  auto want = Generate(*engine_, {g});
  ASSERT_TRUE(want.ok());
  for (size_t entries : {size_t{256}, size_t{0}}) {
    Metrics metrics;
    SchedulerOptions o;
    o.prefix_cache_entries = entries;
    Scheduler s(*engine_, nullptr, metrics, o);
    auto first = Submit(s, Completion(shared, 3));
    WaitDone(*first);
    const uint64_t computed_before = metrics.prompt_tokens.load();
    auto h = Submit(s, Completion(second, 8));
    WaitDone(*h);
    MutexLock lock(h->mu);
    EXPECT_EQ(h->choices[0].token_ids, (*want)[0].generated);
    if (entries > 0 && c.sliding_window > 40) {
      EXPECT_EQ(metrics.prefix_hit_tokens.load(), 36u);  // 9 whole blocks of the 39 cached tokens
      EXPECT_EQ(metrics.prompt_tokens.load() - computed_before, second.size() - 36);
      EXPECT_GT(metrics.kv_blocks_cached.load(), 0);
    } else {
      EXPECT_EQ(metrics.prefix_hit_tokens.load(), 0u);
      EXPECT_EQ(metrics.prompt_tokens.load() - computed_before, second.size());
    }
  }
}

TEST_F(SchedulerTest, CancelledRequestsFreeTheirBlocksAndCountOnce) {
  Make(Small());
  SchedulerOptions o;
  o.kv_blocks = 64;
  Scheduler s(*engine_, nullptr, metrics_, o);
  auto h = Submit(s, Completion(Prompt(20, 1), 70));
  for (int i = 0; i < 2000 && metrics_.kv_blocks_used.load() == 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  EXPECT_GT(metrics_.kv_blocks_used.load(), 0);
  h->Cancel();
  WaitDone(*h);
  for (int i = 0; i < 2000 && metrics_.kv_blocks_used.load() != 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  EXPECT_EQ(metrics_.kv_blocks_used.load(), 0);
  EXPECT_EQ(metrics_.running.load(), 0);
  EXPECT_EQ(metrics_.outcomes[static_cast<size_t>(Outcome::kCancelled)].load(), 1u);
  EXPECT_EQ(metrics_.outcomes[static_cast<size_t>(Outcome::kSuccess)].load(), 0u);
}

TEST_F(SchedulerTest, FullQueueAnswers429AndDrainingAnswers503) {
  Make(Small());
  SchedulerOptions o;
  o.max_queue = 2;
  o.max_running = 1;
  Scheduler s(*engine_, nullptr, metrics_, o);
  std::vector<std::shared_ptr<RequestHandle>> hs;
  int rejected = 0;
  for (int i = 0; i < 8; ++i) {
    auto h = std::make_shared<RequestHandle>("q", Completion(Prompt(10, i), 60));
    if (auto e = s.Submit(h)) {
      EXPECT_EQ(e->http_status, 429);
      ++rejected;
    } else {
      hs.push_back(h);
    }
  }
  EXPECT_GT(rejected, 0);
  s.BeginDrain();
  auto late = std::make_shared<RequestHandle>("late", Completion(Prompt(3, 0), 2));
  auto e = s.Submit(late);
  ASSERT_TRUE(e.has_value());
  EXPECT_EQ(e->http_status, 503);
  for (auto& h : hs) WaitDone(*h);  // what was accepted still finishes
  EXPECT_TRUE(s.Idle());
}

TEST_F(SchedulerTest, ClassificationEqualsClassify) {
  for (auto arch : {Architecture::kSequenceClassification, Architecture::kTokenClassification}) {
    Make(Small(arch));
    SchedulerOptions o;
    o.max_step_tokens = 5;  // inputs arrive in chunks
    Scheduler s(*engine_, nullptr, metrics_, o);
    ParsedRequest r;
    r.endpoint = Endpoint::kClassify;
    r.prompts = {Prompt(13, 2), {7, 8, 0, 0}};  // trailing pads: the last non-pad token is scored
    auto h = Submit(s, r);
    WaitDone(*h);
    MutexLock lock(h->mu);
    ASSERT_FALSE(h->error);
    for (size_t i = 0; i < r.prompts.size(); ++i) {
      auto want = Classify(*engine_, r.prompts[i]);
      ASSERT_TRUE(want.ok()) << want.status().ToString();
      ASSERT_EQ(h->classified[i].logits.size(), want->logits.size());
      for (size_t row = 0; row < want->logits.size(); ++row) {
        for (size_t k = 0; k < want->logits[row].size(); ++k) {
          EXPECT_NEAR(h->classified[i].logits[row][k], want->logits[row][k], 1e-5);
        }
      }
    }
  }
}

}  // namespace
}  // namespace gemma2::serving
