#include "serving/output_constraints.h"

#include <string_view>

#include "serving/request_parser.h"
#include "structured/matcher.h"

namespace gemma2::serving {
namespace {

using json = nlohmann::ordered_json;
using Parsed = std::variant<std::shared_ptr<const OutputConstraint>, ApiError>;

ApiError Bad(std::string param, std::string message, std::string code = "") {
  return BadRequest(std::move(param), std::move(message), std::move(code));
}

// One way of asking for structure: its kind, the cache key and the compiler.
struct Ask {
  std::string param;  // the field it came from, for errors
  std::string kind;
  std::string key;
  ConstraintCache::Compile compile;
};

// A schema given as an object, or as a string holding one (vLLM accepts both).
std::variant<json, ApiError> SchemaValue(const json& v, const std::string& param) {
  if (v.is_object() || v.is_boolean()) return v;
  if (v.is_string()) {
    auto parsed = ParseJsonBody(v.get<std::string>(), kMaxEmbeddedJsonDepth);
    if (auto* j = std::get_if<json>(&parsed); j && (j->is_object() || j->is_boolean())) return *j;
    return Bad(param, "'" + param + "' must be a JSON Schema: a string that is not one (or nests "
                      "deeper than " + std::to_string(kMaxEmbeddedJsonDepth) + ") was given");
  }
  return Bad(param, "'" + param + "' must be a JSON Schema object, not " + v.type_name());
}

Ask SchemaAsk(std::string param, json schema) {
  const std::string key = schema.dump();
  return Ask{std::move(param), "json_schema", "json_schema:" + key,
             [schema = std::move(schema)] { return structured::JsonSchemaGrammar(schema); }};
}

// A schema field: the value, or a string holding it.
std::variant<Ask, ApiError> JsonAsk(std::string param, const json& v, const std::string& field) {
  auto schema = SchemaValue(v, field);
  if (auto* e = std::get_if<ApiError>(&schema)) return *e;
  return SchemaAsk(std::move(param), std::get<json>(std::move(schema)));
}

Ask JsonObjectAsk(std::string param) {
  return Ask{std::move(param), "json_object", "json_object", [] { return structured::JsonGrammar(); }};
}

std::variant<Ask, ApiError> RegexAsk(std::string param, const json& v) {
  if (!v.is_string()) return Bad(param, "'" + param + "' must be a string (a regular expression)");
  std::string pattern = v.get<std::string>();
  return Ask{std::move(param), "regex", "regex:" + pattern,
             [pattern] { return structured::RegexGrammar(pattern); }};
}

std::variant<Ask, ApiError> ChoiceAsk(std::string param, const json& v) {
  if (!v.is_array() || v.empty())
    return Bad(param, "'" + param + "' must be a non-empty list of strings");
  std::vector<std::string> choices;
  for (const json& c : v) {
    if (!c.is_string()) return Bad(param, "'" + param + "' items must be strings");
    choices.push_back(c.get<std::string>());
  }
  return Ask{std::move(param), "choice", "choice:" + v.dump(),
             [choices] { return structured::ChoiceGrammar(choices); }};
}

// OpenAI's response_format: text, json_object, json_schema {name, schema, strict, description}.
std::variant<std::optional<Ask>, ApiError> FromResponseFormat(const json& rf) {
  const std::string param = "response_format";
  if (!rf.is_object() || !rf.contains("type") || !rf["type"].is_string())
    return Bad(param, "'response_format' must be an object with a 'type'");
  for (auto it = rf.begin(); it != rf.end(); ++it) {
    if (it.key() != "type" && it.key() != "json_schema")
      return Bad(param, "unknown field '" + it.key() + "' in response_format", "unsupported_field");
  }
  const std::string type = rf["type"].get<std::string>();
  if (type == "text") return std::optional<Ask>();
  if (type == "json_object") return std::optional<Ask>(JsonObjectAsk(param));
  if (type != "json_schema") {
    return Bad(param, "response_format type '" + type +
                          "' is not supported (text, json_object, json_schema)");
  }
  if (!rf.contains("json_schema") || !rf["json_schema"].is_object())
    return Bad(param, "response_format json_schema needs a 'json_schema' object");
  const json& js = rf["json_schema"];
  for (auto it = js.begin(); it != js.end(); ++it) {
    static const std::vector<std::string_view> kKnown = {"name", "schema", "strict", "description"};
    if (std::find(kKnown.begin(), kKnown.end(), it.key()) == kKnown.end())
      return Bad(param, "unknown field '" + it.key() + "' in response_format.json_schema",
                 "unsupported_field");
  }
  // Without a schema, any JSON object (as vLLM).
  if (!js.contains("schema") || js["schema"].is_null()) return std::optional<Ask>(JsonObjectAsk(param));
  auto schema = SchemaValue(js["schema"], "response_format.json_schema.schema");
  if (auto* e = std::get_if<ApiError>(&schema)) return *e;
  return std::optional<Ask>(SchemaAsk(param, std::get<json>(std::move(schema))));
}

// vLLM's structured_outputs: exactly one of json, regex, choice, json_object.
std::variant<std::optional<Ask>, ApiError> FromStructuredOutputs(const json& so) {
  const std::string param = "structured_outputs";
  if (!so.is_object()) return Bad(param, "'structured_outputs' must be an object");
  std::optional<Ask> ask;
  for (auto it = so.begin(); it != so.end(); ++it) {
    if (it->is_null()) continue;
    const std::string& k = it.key();
    std::variant<Ask, ApiError> one = Bad(param, "");
    if (k == "json") {
      one = JsonAsk(param, *it, "structured_outputs.json");
    } else if (k == "regex") {
      one = RegexAsk(param, *it);
    } else if (k == "choice") {
      one = ChoiceAsk(param, *it);
    } else if (k == "json_object") {
      if (!it->is_boolean()) return Bad(param, "'structured_outputs.json_object' must be a boolean");
      if (!it->get<bool>()) continue;
      one = JsonObjectAsk(param);
    } else {
      return Bad(param, "structured_outputs." + k +
                            " is not supported (json, regex, choice, json_object)",
                 "unsupported_field");
    }
    if (auto* e = std::get_if<ApiError>(&one)) return *e;
    if (ask) return Bad(param, "structured_outputs asks for two structures; give one");
    ask = std::get<Ask>(std::move(one));
  }
  return ask;
}

Parsed Compiled(const Ask& ask, ConstraintCache* cache) {
  if (!cache) {
    return Bad(ask.param, "structured output needs the model's tokenizer.model (the tokens' "
                          "bytes): this server has none");
  }
  auto c = cache->Get(ask.kind, ask.key, ask.compile);
  if (!c.ok()) return Bad(ask.param, c.status().message(), "unsupported_schema");
  return *c;
}

}  // namespace

bool ConstraintState::Advance(int32_t token) {
  const structured::TokenVocabulary& vocab = c_->masker->vocab();
  if (token < 0 || token >= vocab.size()) return false;
  for (const char b : vocab.bytes(token)) {
    next_.clear();
    structured::Step(*c_->grammar, state_, static_cast<uint8_t>(b), next_);
    if (next_.empty()) return false;
    std::swap(state_, next_);
  }
  return true;
}

ConstraintCache::ConstraintCache(const Tokenizer& tokenizer, std::vector<int32_t> stop_ids,
                                 size_t capacity)
    : tokenizer_(tokenizer), stop_ids_(std::move(stop_ids)), capacity_(std::max<size_t>(1, capacity)) {}

Result<std::shared_ptr<const OutputConstraint>> ConstraintCache::Get(const std::string& kind,
                                                                     const std::string& key,
                                                                     const Compile& compile) {
  {
    MutexLock lock(mu_);
    if (auto it = entries_.find(key); it != entries_.end()) {
      ages_.splice(ages_.begin(), ages_, it->second.age);
      return it->second.constraint;
    }
  }
  // Compiled outside the lock: a large schema does not hold up other requests' lookups.
  ASSIGN_OR_RETURN(auto grammar, compile());
  std::call_once(vocab_once_, [&] {
    vocab_ = std::make_shared<const structured::TokenVocabulary>(tokenizer_.TokenBytes(), stop_ids_);
  });
  auto made = std::make_shared<OutputConstraint>();
  made->kind = kind;
  made->grammar = grammar;
  ASSIGN_OR_RETURN(made->start, structured::Start(*grammar));
  made->masker = std::make_shared<structured::TokenMasker>(grammar, vocab_);
  MutexLock lock(mu_);
  if (auto it = entries_.find(key); it != entries_.end()) return it->second.constraint;  // raced
  ages_.push_front(key);
  entries_[key] = Entry{made, ages_.begin()};
  while (entries_.size() > capacity_) {
    entries_.erase(ages_.back());
    ages_.pop_back();
  }
  return std::shared_ptr<const OutputConstraint>(made);
}

size_t ConstraintCache::size() const {
  MutexLock lock(mu_);
  return entries_.size();
}

Parsed ParseOutputConstraint(const ConstraintFields& f, ConstraintCache* cache) {
  std::vector<Ask> asks;
  auto add = [&](std::variant<std::optional<Ask>, ApiError> r) -> std::optional<ApiError> {
    if (auto* e = std::get_if<ApiError>(&r)) return *e;
    if (auto& a = std::get<std::optional<Ask>>(r)) asks.push_back(std::move(*a));
    return std::nullopt;
  };
  auto add_one = [&](std::variant<Ask, ApiError> r) -> std::optional<ApiError> {
    if (auto* e = std::get_if<ApiError>(&r)) return *e;
    asks.push_back(std::get<Ask>(std::move(r)));
    return std::nullopt;
  };
  std::optional<ApiError> e;
  if (f.response_format) e = add(FromResponseFormat(*f.response_format));
  if (!e && f.structured_outputs) e = add(FromStructuredOutputs(*f.structured_outputs));
  if (!e && f.guided_json) e = add_one(JsonAsk("guided_json", *f.guided_json, "guided_json"));
  if (!e && f.guided_regex) e = add_one(RegexAsk("guided_regex", *f.guided_regex));
  if (!e && f.guided_choice) e = add_one(ChoiceAsk("guided_choice", *f.guided_choice));
  if (e) return *e;
  if (asks.empty()) return std::shared_ptr<const OutputConstraint>();
  if (asks.size() > 1) {
    return Bad(asks[1].param, "'" + asks[0].param + "' and '" + asks[1].param +
                                  "' both ask for structure; give one");
  }
  return Compiled(asks[0], cache);
}

Parsed ToolCallConstraint(const std::vector<structured::ToolSchema>& tools, bool list,
                          ConstraintCache* cache) {
  json key = json::array();
  for (const auto& t : tools) key.push_back({t.name, t.parameters});
  return Compiled(Ask{"tools", "tool_calls", std::string(list ? "calls:" : "call:") + key.dump(),
                      [tools, list] { return structured::ToolCallsGrammar(tools, list); }},
                  cache);
}

}  // namespace gemma2::serving
