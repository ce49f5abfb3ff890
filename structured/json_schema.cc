#include "structured/json_schema.h"

#include <cctype>
#include <cmath>
#include <map>
#include <optional>
#include <set>
#include <string_view>

namespace gemma2::structured {
namespace {

using json = nlohmann::ordered_json;  // properties keep the schema's order
using Piece = GrammarBuilder::Piece;

constexpr int64_t kMaxDigits = 16;           // integer and fraction digits
constexpr int64_t kIntegerLimit = 9999999999999999;  // 16 digits: unbounded integer ranges
constexpr int kMaxSchemaDepth = 64;

ByteSet Range(uint8_t lo, uint8_t hi) {
  ByteSet s;
  for (int c = lo; c <= hi; ++c) s.set(static_cast<size_t>(c));
  return s;
}

Status TooLarge(const char* what) {
  return InvalidArgument(std::string(what) + ": the grammar would exceed " +
                         std::to_string(GrammarBuilder::kMaxRules) + " rules or " +
                         std::to_string(GrammarBuilder::kMaxPieces) +
                         " elements (lower the lengths, counts and literals)");
}

class Compiler {
 public:
  explicit Compiler(const json* root) : root_(root) { Basics(); }

  GrammarBuilder b;
  int32_t value = -1, object_any = -1, string_any = -1, number_any = -1, integer_any = -1;

  Result<int32_t> Schema(const json& s, int depth);
  // `s` as a document of its own: its $refs name its own $defs.
  Result<int32_t> Document(const json& s) {
    root_ = &s;
    refs_.clear();
    return Schema(s, 0);
  }

 private:
  void Basics();
  int32_t String(int64_t min, int64_t max) {
    const int32_t body = b.Repeat(char_, min, max);
    return b.Sequence({quote_, body, quote_});
  }
  int32_t Literal(const json& v) { return b.Literal(v.dump()); }
  Result<int32_t> Integer(const json& s);
  int32_t NonNegativeRange(int64_t lo, int64_t hi);
  int32_t SameLengthRange(const std::string& lo, const std::string& hi);
  Result<int32_t> Object(const json& s, int depth);
  Result<int32_t> Array(const json& s, int depth);
  Result<int32_t> Ref(const std::string& ref, int depth);
  Result<int32_t> Typed(const std::string& type, const json& s, int depth);

  const json* root_;
  int32_t char_ = -1, quote_ = -1, digit_ = -1, comma_ = -1;
  std::map<std::string, int32_t> refs_;
  std::set<std::string> resolving_;
};

void Compiler::Basics() {
  // A string's characters: printable ASCII but '"' and '\', escapes, and exact UTF-8.
  char_ = b.NewRule("char");
  ByteSet plain = Range(0x20, 0x7f);
  plain.reset('"');
  plain.reset('\\');
  b.AddAlternative(char_, {GrammarBuilder::Bytes(plain)});
  ByteSet esc;
  for (char c : std::string_view("\"\\/bfnrt")) esc.set(static_cast<uint8_t>(c));
  b.AddAlternative(char_, {GrammarBuilder::Byte('\\'), GrammarBuilder::Bytes(esc)});
  ByteSet hex = Range('0', '9') | Range('a', 'f') | Range('A', 'F');
  b.AddAlternative(char_, {GrammarBuilder::Byte('\\'), GrammarBuilder::Byte('u'),
                           GrammarBuilder::Bytes(hex), GrammarBuilder::Bytes(hex),
                           GrammarBuilder::Bytes(hex), GrammarBuilder::Bytes(hex)});
  // UTF-8 characters end in shared tails of 1, 2 or 3 continuation bytes, so every character
  // that has the same bytes left is in the same state (fewer states for the masker to meet).
  const Piece cont = GrammarBuilder::Bytes(Range(0x80, 0xbf));
  const int32_t tail1 = b.NewRule("utf8_tail1"), tail2 = b.NewRule("utf8_tail2"),
                tail3 = b.NewRule("utf8_tail3");
  b.AddAlternative(tail1, {cont});
  b.AddAlternative(tail2, {cont, GrammarBuilder::Ref(tail1)});
  b.AddAlternative(tail3, {cont, GrammarBuilder::Ref(tail2)});
  auto utf8 = [&](ByteSet lead, std::optional<ByteSet> second, int32_t tail) {
    std::vector<Piece> pieces = {GrammarBuilder::Bytes(lead)};
    if (second) pieces.push_back(GrammarBuilder::Bytes(*second));
    pieces.push_back(GrammarBuilder::Ref(tail));
    b.AddAlternative(char_, pieces);
  };
  utf8(Range(0xc2, 0xdf), std::nullopt, tail1);
  utf8(Range(0xe0, 0xe0), Range(0xa0, 0xbf), tail1);
  utf8(Range(0xe1, 0xec) | Range(0xee, 0xef), std::nullopt, tail2);
  utf8(Range(0xed, 0xed), Range(0x80, 0x9f), tail1);
  utf8(Range(0xf0, 0xf0), Range(0x90, 0xbf), tail2);
  utf8(Range(0xf1, 0xf3), std::nullopt, tail3);
  utf8(Range(0xf4, 0xf4), Range(0x80, 0x8f), tail2);
  quote_ = b.Literal("\"");
  comma_ = b.Literal(",");
  digit_ = b.Set(Range('0', '9'));
  string_any = String(0, -1);

  // Numbers: -?(0|[1-9][0-9]{0,15})(.[0-9]{1,16})?([eE][+-]?[0-9]{1,2})? (at most 1e115: a double)
  const int32_t minus = b.Optional(b.Literal("-"));
  const int32_t nonzero = b.Sequence({b.Set(Range('1', '9')), b.Repeat(digit_, 0, kMaxDigits - 1)});
  integer_any = b.Sequence({minus, b.Choice({b.Literal("0"), nonzero})});
  const int32_t frac = b.Optional(b.Sequence({b.Literal("."), b.Repeat(digit_, 1, kMaxDigits)}));
  ByteSet e;
  e.set('e');
  e.set('E');
  ByteSet sign;
  sign.set('+');
  sign.set('-');
  const int32_t exp = b.Optional(
      b.Sequence({b.Set(e), b.Optional(b.Set(sign)), b.Repeat(digit_, 1, 2)}));
  number_any = b.Sequence({integer_any, frac, exp});

  // Any value (objects and arrays nest through their brackets: no left recursion).
  value = b.NewRule("value");
  object_any = b.NewRule("object");
  const int32_t array_any = b.NewRule("array");
  const int32_t pair = b.Sequence({string_any, b.Literal(":"), value});
  b.AddAlternative(object_any,
                   {GrammarBuilder::Byte('{'),
                    GrammarBuilder::Ref(b.Optional(
                        b.Sequence({pair, b.Star(b.Sequence({comma_, pair}))}))),
                    GrammarBuilder::Byte('}')});
  b.AddAlternative(array_any,
                   {GrammarBuilder::Byte('['),
                    GrammarBuilder::Ref(b.Optional(
                        b.Sequence({value, b.Star(b.Sequence({comma_, value}))}))),
                    GrammarBuilder::Byte(']')});
  for (int32_t r : {object_any, array_any, string_any, number_any, b.Literal("true"),
                    b.Literal("false"), b.Literal("null")}) {
    b.AddAlternative(value, {GrammarBuilder::Ref(r)});
  }
}

// Decimal strings of one length from lo to hi (digits, leading zeros allowed inside).
int32_t Compiler::SameLengthRange(const std::string& lo, const std::string& hi) {
  // Every string of the length: said once (the recursion below would branch twice per digit).
  if (lo.find_first_not_of('0') == std::string::npos && hi.find_first_not_of('9') == std::string::npos)
    return b.Repeat(digit_, static_cast<int64_t>(lo.size()), static_cast<int64_t>(lo.size()));
  if (lo.size() == 1) return b.Set(Range(static_cast<uint8_t>(lo[0]), static_cast<uint8_t>(hi[0])));
  const std::string lo_rest = lo.substr(1), hi_rest = hi.substr(1);
  if (lo[0] == hi[0]) return b.Sequence({b.Literal(lo.substr(0, 1)), SameLengthRange(lo_rest, hi_rest)});
  const std::string nines(lo_rest.size(), '9'), zeros(lo_rest.size(), '0');
  std::vector<int32_t> alts;
  alts.push_back(b.Sequence({b.Literal(lo.substr(0, 1)), SameLengthRange(lo_rest, nines)}));
  if (hi[0] - lo[0] > 1) {
    alts.push_back(b.Sequence({b.Set(Range(static_cast<uint8_t>(lo[0] + 1),
                                           static_cast<uint8_t>(hi[0] - 1))),
                               b.Repeat(digit_, static_cast<int64_t>(lo_rest.size()),
                                        static_cast<int64_t>(lo_rest.size()))}));
  }
  alts.push_back(b.Sequence({b.Literal(hi.substr(0, 1)), SameLengthRange(zeros, hi_rest)}));
  return b.Choice(alts);
}

// Canonical decimals (no leading zeros) of every integer in [lo, hi], 0 <= lo <= hi.
int32_t Compiler::NonNegativeRange(int64_t lo, int64_t hi) {
  std::vector<int32_t> alts;
  int64_t low = lo;
  for (int64_t width = 1, top = 9; low <= hi; ++width, top = top * 10 + 9) {
    if (low > top) continue;
    const int64_t high = std::min(hi, top);
    alts.push_back(SameLengthRange(std::to_string(low), std::to_string(high)));
    low = high + 1;
    if (top >= kIntegerLimit) break;
  }
  return b.Choice(alts);
}

Result<int32_t> Compiler::Integer(const json& s) {
  int64_t lo = -kIntegerLimit, hi = kIntegerLimit;
  auto bound = [&](const char* key, bool lower, bool exclusive) -> Status {
    if (!s.contains(key)) return OkStatus();
    const json& v = s[key];
    if (v.is_boolean()) return InvalidArgument(std::string("json_schema: boolean '") + key + "'");
    if (!v.is_number()) return InvalidArgument(std::string("json_schema: '") + key + "' must be a number");
    const double d = v.get<double>();
    if (!std::isfinite(d) || std::fabs(d) > static_cast<double>(kIntegerLimit))
      return InvalidArgument(std::string("json_schema: '") + key + "' is out of range");
    if (lower) {
      int64_t x = static_cast<int64_t>(std::ceil(d));
      if (exclusive && static_cast<double>(x) == d) ++x;
      lo = std::max(lo, x);
    } else {
      int64_t x = static_cast<int64_t>(std::floor(d));
      if (exclusive && static_cast<double>(x) == d) --x;
      hi = std::min(hi, x);
    }
    return OkStatus();
  };
  RETURN_IF_ERROR(bound("minimum", true, false));
  RETURN_IF_ERROR(bound("exclusiveMinimum", true, true));
  RETURN_IF_ERROR(bound("maximum", false, false));
  RETURN_IF_ERROR(bound("exclusiveMaximum", false, true));
  if (lo > hi) return InvalidArgument("json_schema: no integer lies between minimum and maximum");
  if (lo == -kIntegerLimit && hi == kIntegerLimit) return integer_any;
  std::vector<int32_t> alts;
  if (lo < 0) alts.push_back(b.Sequence({b.Literal("-"), NonNegativeRange(std::max<int64_t>(1, -hi), -lo)}));
  if (hi >= 0) alts.push_back(NonNegativeRange(std::max<int64_t>(0, lo), hi));
  return b.Choice(alts);
}

Result<int32_t> Compiler::Object(const json& s, int depth) {
  if (!s.contains("properties")) {
    if (s.contains("required") && !s["required"].empty())
      return InvalidArgument("json_schema: 'required' without 'properties'");
    return object_any;
  }
  const json& props = s["properties"];
  if (!props.is_object()) return InvalidArgument("json_schema: 'properties' must be an object");
  std::set<std::string> required;
  if (s.contains("required")) {
    if (!s["required"].is_array()) return InvalidArgument("json_schema: 'required' must be an array");
    for (const json& r : s["required"]) {
      if (!r.is_string()) return InvalidArgument("json_schema: 'required' holds a non-string");
      if (!props.contains(r.get<std::string>()))
        return InvalidArgument("json_schema: required property '" + r.get<std::string>() +
                               "' is not in 'properties'");
      required.insert(r.get<std::string>());
    }
  }
  if (s.contains("additionalProperties") && !s["additionalProperties"].is_boolean() &&
      !s["additionalProperties"].is_object())
    return InvalidArgument("json_schema: 'additionalProperties' must be a boolean or a schema");
  // Properties in the schema's order; optional ones may be left out, commas only between.
  struct Prop {
    int32_t pair;
    bool required;
  };
  std::vector<Prop> list;
  for (auto it = props.begin(); it != props.end(); ++it) {
    ASSIGN_OR_RETURN(const int32_t v, Schema(it.value(), depth + 1));
    list.push_back({b.Sequence({b.Literal(json(it.key()).dump() + ":"), v}), required.count(it.key()) > 0});
  }
  // rest[i][first]: properties i.. with `first` telling whether none was written yet.
  const size_t n = list.size();
  std::vector<std::array<int32_t, 2>> rest(n + 1);
  rest[n] = {b.Empty(), b.Empty()};
  for (size_t i = n; i-- > 0;) {
    for (int first = 0; first < 2; ++first) {
      const int32_t with = first ? b.Sequence({list[i].pair, rest[i + 1][0]})
                                 : b.Sequence({comma_, list[i].pair, rest[i + 1][0]});
      rest[i][static_cast<size_t>(first)] =
          list[i].required ? with : b.Choice({with, rest[i + 1][static_cast<size_t>(first)]});
    }
  }
  return b.Sequence({b.Literal("{"), rest[0][1], b.Literal("}")});
}

Result<int32_t> Compiler::Array(const json& s, int depth) {
  int32_t item = value;
  if (s.contains("items")) {
    ASSIGN_OR_RETURN(item, Schema(s["items"], depth + 1));
  }
  auto count = [&](const char* key, int64_t dflt) -> Result<int64_t> {
    if (!s.contains(key)) return dflt;
    if (!s[key].is_number_integer() || s[key].get<int64_t>() < 0 || s[key].get<int64_t>() > 4096)
      return InvalidArgument(std::string("json_schema: '") + key + "' must be an integer 0..4096");
    return s[key].get<int64_t>();
  };
  ASSIGN_OR_RETURN(const int64_t min, count("minItems", 0));
  ASSIGN_OR_RETURN(const int64_t max, count("maxItems", -1));
  if (max >= 0 && max < min) return InvalidArgument("json_schema: maxItems < minItems");
  int32_t body;
  if (max == 0) {
    body = b.Empty();
  } else {
    const int32_t more = b.Repeat(b.Sequence({comma_, item}), std::max<int64_t>(0, min - 1),
                                  max < 0 ? -1 : max - 1);
    const int32_t some = b.Sequence({item, more});
    body = min == 0 ? b.Optional(some) : some;
  }
  return b.Sequence({b.Literal("["), body, b.Literal("]")});
}

Result<int32_t> Compiler::Ref(const std::string& ref, int depth) {
  if (auto it = refs_.find(ref); it != refs_.end()) return it->second;
  std::string name;
  const json* defs = nullptr;
  for (const char* prefix : {"#/$defs/", "#/definitions/"}) {
    if (ref.rfind(prefix, 0) == 0) {
      name = ref.substr(std::string_view(prefix).size());
      const char* key = prefix[2] == '$' ? "$defs" : "definitions";
      if (root_ && root_->is_object() && root_->contains(key)) defs = &(*root_)[key];
    }
  }
  if (!defs || !defs->is_object() || !defs->contains(name))
    return InvalidArgument("json_schema: $ref '" + ref + "' does not name an entry of $defs");
  if (resolving_.count(ref)) return InvalidArgument("json_schema: $ref '" + ref + "' is recursive");
  resolving_.insert(ref);
  Result<int32_t> r = Schema((*defs)[name], depth + 1);
  resolving_.erase(ref);
  if (r.ok()) refs_[ref] = *r;
  return r;
}

Result<int32_t> Compiler::Typed(const std::string& type, const json& s, int depth) {
  if (type == "string") {
    int64_t min = 0, max = -1;
    for (const char* key : {"minLength", "maxLength"}) {
      if (!s.contains(key)) continue;
      if (!s[key].is_number_integer() || s[key].get<int64_t>() < 0 || s[key].get<int64_t>() > 65536)
        return InvalidArgument(std::string("json_schema: '") + key + "' must be an integer 0..65536");
      (key[1] == 'i' ? min : max) = s[key].get<int64_t>();
    }
    if (max >= 0 && max < min) return InvalidArgument("json_schema: maxLength < minLength");
    return min == 0 && max < 0 ? string_any : String(min, max);
  }
  if (type == "integer") return Integer(s);
  if (type == "number") {
    for (const char* key : {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}) {
      if (s.contains(key))
        return InvalidArgument(std::string("json_schema: '") + key +
                               "' is supported for integers only, not numbers");
    }
    return number_any;
  }
  if (type == "boolean") return b.Choice({b.Literal("true"), b.Literal("false")});
  if (type == "null") return b.Literal("null");
  if (type == "object") return Object(s, depth);
  if (type == "array") return Array(s, depth);
  return InvalidArgument("json_schema: unknown type '" + type + "'");
}

Result<int32_t> Compiler::Schema(const json& s, int depth) {
  if (depth > kMaxSchemaDepth) return InvalidArgument("json_schema: nested too deep");
  if (b.too_large()) return TooLarge("json_schema");
  if (s.is_boolean()) {
    if (!s.get<bool>()) return InvalidArgument("json_schema: the schema 'false' matches nothing");
    return value;
  }
  if (!s.is_object()) return InvalidArgument("json_schema: a schema must be an object");
  static const std::set<std::string> kKnown = {
      "type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems",
      "enum", "const", "anyOf", "oneOf", "minLength", "maxLength", "minimum", "maximum",
      "exclusiveMinimum", "exclusiveMaximum", "$defs", "definitions", "$ref", "nullable",
      "title", "description", "examples", "default", "$schema", "$id", "$comment"};
  for (auto it = s.begin(); it != s.end(); ++it) {
    if (!kKnown.count(it.key()))
      return InvalidArgument("json_schema: keyword '" + it.key() + "' is not supported");
  }
  if (s.contains("$ref")) {
    if (!s["$ref"].is_string()) return InvalidArgument("json_schema: '$ref' must be a string");
    return Ref(s["$ref"].get<std::string>(), depth);
  }
  if (s.contains("const")) {
    const int32_t r = Literal(s["const"]);
    if (b.too_large()) return TooLarge("json_schema");
    return r;
  }
  if (s.contains("enum")) {
    if (!s["enum"].is_array() || s["enum"].empty())
      return InvalidArgument("json_schema: 'enum' must be a non-empty array");
    std::vector<int32_t> alts;
    for (const json& v : s["enum"]) {
      if (b.too_large()) return TooLarge("json_schema");
      alts.push_back(Literal(v));
    }
    return b.Choice(alts);
  }
  for (const char* key : {"anyOf", "oneOf"}) {
    if (!s.contains(key)) continue;
    if (!s[key].is_array() || s[key].empty())
      return InvalidArgument(std::string("json_schema: '") + key + "' must be a non-empty array");
    std::vector<int32_t> alts;
    for (const json& sub : s[key]) {
      ASSIGN_OR_RETURN(const int32_t r, Schema(sub, depth + 1));
      alts.push_back(r);
    }
    return b.Choice(alts);
  }
  std::vector<std::string> types;
  if (s.contains("type")) {
    if (s["type"].is_string()) {
      types.push_back(s["type"].get<std::string>());
    } else if (s["type"].is_array() && !s["type"].empty()) {
      for (const json& t : s["type"]) {
        if (!t.is_string()) return InvalidArgument("json_schema: 'type' holds a non-string");
        types.push_back(t.get<std::string>());
      }
    } else {
      return InvalidArgument("json_schema: 'type' must be a string or a non-empty array");
    }
  } else if (s.contains("properties")) {
    types = {"object"};
  } else if (s.contains("items")) {
    types = {"array"};
  } else {
    return value;
  }
  if (s.value("nullable", false)) types.push_back("null");
  std::vector<int32_t> alts;
  for (const std::string& t : types) {
    ASSIGN_OR_RETURN(const int32_t r, Typed(t, s, depth));
    alts.push_back(r);
  }
  return alts.size() == 1 ? alts[0] : b.Choice(alts);
}

std::shared_ptr<const Grammar> Share(Grammar g) { return std::make_shared<const Grammar>(std::move(g)); }

}  // namespace

Result<std::shared_ptr<const Grammar>> JsonGrammar() {
  Compiler c(nullptr);
  return Share(c.b.Finish(c.object_any));
}

Result<std::shared_ptr<const Grammar>> JsonSchemaGrammar(const json& schema) {
  Compiler c(&schema);
  ASSIGN_OR_RETURN(const int32_t root, c.Schema(schema, 0));
  if (c.b.too_large()) return TooLarge("json_schema");
  return Share(c.b.Finish(root));
}

Result<std::shared_ptr<const Grammar>> ToolCallsGrammar(const std::vector<ToolSchema>& tools,
                                                        bool list) {
  if (tools.empty()) return InvalidArgument("tools: no function to call");
  Compiler c(nullptr);
  std::vector<int32_t> calls;
  for (const ToolSchema& t : tools) {
    int32_t args = c.object_any;
    if (!t.parameters.is_null()) {
      auto r = c.Document(t.parameters);
      if (!r.ok()) return InvalidArgument("function '" + t.name + "': " + r.status().message());
      args = *r;
    }
    calls.push_back(c.b.Sequence({c.b.Literal("{\"name\":" + json(t.name).dump() + ",\"arguments\":"),
                                  args, c.b.Literal("}")}));
  }
  if (c.b.too_large()) return TooLarge("tools");
  const int32_t call = c.b.Choice(calls);
  if (!list) return Share(c.b.Finish(call));
  const int32_t more = c.b.Star(c.b.Sequence({c.b.Literal(","), call}));
  const int32_t calls_list = c.b.Sequence({c.b.Literal("["), call, more, c.b.Literal("]")});
  return Share(c.b.Finish(c.b.Choice({call, calls_list})));
}

Result<std::shared_ptr<const Grammar>> ChoiceGrammar(const std::vector<std::string>& choices) {
  if (choices.empty()) return InvalidArgument("choice: the list is empty");
  GrammarBuilder b;
  std::vector<int32_t> alts;
  alts.reserve(choices.size());
  for (const std::string& c : choices) {
    if (b.too_large()) return TooLarge("choice");
    alts.push_back(b.Literal(c));
  }
  if (b.too_large()) return TooLarge("choice");
  const int32_t root = b.Choice(alts);
  return Share(b.Finish(root));
}

namespace {

// A recursive-descent reading of the regex subset (json_schema.h) into rules.
class RegexCompiler {
 public:
  explicit RegexCompiler(std::string_view p) : p_(p) {}
  GrammarBuilder b;

  Result<int32_t> Whole() {
    if (!p_.empty() && p_.front() == '^') p_.remove_prefix(1);
    if (!p_.empty() && p_.back() == '$' && (p_.size() < 2 || p_[p_.size() - 2] != '\\'))
      p_.remove_suffix(1);
    ASSIGN_OR_RETURN(const int32_t r, Alternation(0));
    if (i_ != p_.size()) return Error("unexpected ')'");
    return r;
  }

 private:
  Status Error(const std::string& what) const {
    return InvalidArgument("regex: " + what + " at offset " + std::to_string(i_));
  }
  bool More() const { return i_ < p_.size(); }
  char Peek() const { return p_[i_]; }

  Result<int32_t> Alternation(int depth) {
    if (depth > 64) return Error("groups nested too deep");
    std::vector<int32_t> alts;
    while (true) {
      ASSIGN_OR_RETURN(const int32_t seq, Concatenation(depth));
      alts.push_back(seq);
      if (More() && Peek() == '|') {
        ++i_;
        continue;
      }
      break;
    }
    return alts.size() == 1 ? alts[0] : b.Choice(alts);
  }

  Result<int32_t> Concatenation(int depth) {
    std::vector<int32_t> parts;
    while (More() && Peek() != '|' && Peek() != ')') {
      ASSIGN_OR_RETURN(int32_t atom, Atom(depth));
      ASSIGN_OR_RETURN(atom, Quantified(atom));
      parts.push_back(atom);
    }
    return parts.empty() ? b.Empty() : b.Sequence(parts);
  }

  Result<int32_t> Quantified(int32_t atom) {
    while (More()) {
      if (b.too_large()) return TooLarge("regex");
      const char c = Peek();
      int64_t min = 0, max = -1;
      if (c == '*') {
        ++i_;
      } else if (c == '+') {
        ++i_;
        min = 1;
      } else if (c == '?') {
        ++i_;
        max = 1;
      } else if (c == '{') {
        const size_t close = p_.find('}', i_);
        if (close == std::string_view::npos) return Error("unclosed '{'");
        const std::string body(p_.substr(i_ + 1, close - i_ - 1));
        const size_t comma = body.find(',');
        auto num = [&](const std::string& t, int64_t* out) -> bool {
          if (t.empty() || t.size() > 4 || t.find_first_not_of("0123456789") != std::string::npos)
            return false;
          *out = std::stoll(t);
          return true;
        };
        if (comma == std::string::npos) {
          if (!num(body, &min)) return Error("bad {n}");
          max = min;
        } else {
          if (!num(body.substr(0, comma), &min)) return Error("bad {n,m}");
          const std::string hi = body.substr(comma + 1);
          if (!hi.empty() && !num(hi, &max)) return Error("bad {n,m}");
          if (max >= 0 && max < min) return Error("{n,m} with m < n");
        }
        if (min > 1000 || max > 1000) return Error("a count above 1000");
        i_ = close + 1;
      } else {
        break;
      }
      atom = b.Repeat(atom, min, max);
    }
    return atom;
  }

  static ByteSet Class(char c) {
    ByteSet s;
    auto add = [&](char lo, char hi) {
      for (int x = static_cast<uint8_t>(lo); x <= static_cast<uint8_t>(hi); ++x) s.set(static_cast<size_t>(x));
    };
    switch (c) {
      case 'd': case 'D': add('0', '9'); break;
      case 'w': case 'W': add('0', '9'); add('a', 'z'); add('A', 'Z'); s.set('_'); break;
      case 's': case 'S': for (char x : std::string_view(" \t\n\r\f\v")) s.set(static_cast<uint8_t>(x)); break;
      default: break;
    }
    if (c == 'D' || c == 'W' || c == 'S') s = ~s & Range(0x20, 0x7e);  // printable ASCII only
    return s;
  }

  // An escape after '\\': a class, or the byte it stands for.
  Result<ByteSet> Escape() {
    if (!More()) return Error("a trailing backslash");
    const char c = p_[i_++];
    if (std::string_view("dDwWsS").find(c) != std::string_view::npos) return Class(c);
    ByteSet s;
    switch (c) {
      case 'n': s.set('\n'); break;
      case 't': s.set('\t'); break;
      case 'r': s.set('\r'); break;
      default:
        if (std::isalnum(static_cast<unsigned char>(c))) return Error(std::string("escape \\") + c + " is not supported");
        s.set(static_cast<uint8_t>(c));
    }
    return s;
  }

  Result<int32_t> Atom(int depth) {
    const char c = p_[i_++];
    if (c == '(') {
      if (p_.substr(i_, 2) == "?:") i_ += 2;
      else if (More() && Peek() == '?') return Error("lookaround and named groups are not supported");
      ASSIGN_OR_RETURN(const int32_t inner, Alternation(depth + 1));
      if (!More() || Peek() != ')') return Error("unclosed '('");
      ++i_;
      return inner;
    }
    if (c == '[') return Bracket();
    if (c == '.') {
      ByteSet any = Range(0x20, 0x7e);  // printable ASCII (no newline)
      return b.Set(any);
    }
    if (c == '\\') {
      ASSIGN_OR_RETURN(const ByteSet s, Escape());
      return b.Set(s);
    }
    if (c == '*' || c == '+' || c == '?' || c == '{') return Error("a quantifier with nothing before it");
    if (c == '^' || c == '$') return Error("anchors are supported only at the ends");
    ByteSet s;
    s.set(static_cast<uint8_t>(c));
    return b.Set(s);
  }

  Result<int32_t> Bracket() {
    bool negate = false;
    if (More() && Peek() == '^') {
      negate = true;
      ++i_;
    }
    ByteSet s;
    bool first = true;
    while (true) {
      if (!More()) return Error("unclosed '['");
      char c = p_[i_++];
      if (c == ']' && !first) break;
      first = false;
      ByteSet one;
      if (c == '\\') {
        ASSIGN_OR_RETURN(one, Escape());
        s |= one;
        continue;
      }
      if (More() && Peek() == '-' && i_ + 1 < p_.size() && p_[i_ + 1] != ']') {
        const char hi = p_[i_ + 1];
        i_ += 2;
        if (static_cast<uint8_t>(hi) < static_cast<uint8_t>(c)) return Error("a reversed range");
        s |= Range(static_cast<uint8_t>(c), static_cast<uint8_t>(hi));
        continue;
      }
      s.set(static_cast<uint8_t>(c));
    }
    if (negate) s = ~s & Range(0x20, 0x7e);
    return b.Set(s);
  }

  std::string_view p_;
  size_t i_ = 0;
};

}  // namespace

Result<std::shared_ptr<const Grammar>> RegexGrammar(const std::string& pattern) {
  if (pattern.size() > 4096) return InvalidArgument("regex: longer than 4096 bytes");
  RegexCompiler c(pattern);
  ASSIGN_OR_RETURN(const int32_t root, c.Whole());
  if (c.b.too_large()) return TooLarge("regex");
  return Share(c.b.Finish(root));
}

}  // namespace gemma2::structured
