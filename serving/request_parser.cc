#include "serving/request_parser.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <set>

#include "common/json_depth.h"
#include "serving/logits_processing.h"
#include "serving/tool_calls.h"

namespace gemma2::serving {
namespace {

using json = RequestJson;

// Thrown inside this file only; every entry point turns it into an ApiError.
struct Reject {
  ApiError error;
};

[[noreturn]] void Fail(std::string param, std::string message, int status = 400,
                       std::string code = "") {
  throw Reject{ApiError{status, std::move(message), "invalid_request_error", std::move(param),
                        std::move(code)}};
}

const char* TypeName(const json& v) { return v.type_name(); }

// Typed access to an object's fields; remembers which ones were read so the rest are "unknown".
class Fields {
 public:
  Fields(const json& obj, bool strict) : obj_(obj), strict_(strict) {
    if (!obj.is_object())
      Fail("", std::string("the body must be a JSON object, not ") + TypeName(obj));
  }
  // The field, or null when absent (OpenAI treats an explicit null as absent).
  const json* Get(const std::string& name) {
    seen_.insert(name);
    auto it = obj_.find(name);
    return it == obj_.end() || it->is_null() ? nullptr : &*it;
  }
  void Ignore(const std::string& name) { seen_.insert(name); }
  bool Bool(const std::string& name, bool fallback) {
    const json* v = Get(name);
    if (!v) return fallback;
    if (!v->is_boolean()) Fail(name, "'" + name + "' must be a boolean, not " + TypeName(*v));
    return v->get<bool>();
  }
  int64_t Int(const std::string& name, int64_t fallback) {
    const json* v = Get(name);
    if (!v) return fallback;
    if (!v->is_number_integer())
      Fail(name, "'" + name + "' must be an integer, not " + TypeName(*v));
    if (v->is_number_unsigned() && v->get<uint64_t>() > static_cast<uint64_t>(INT64_MAX)) {
      Fail(name, "'" + name + "' is too large");
    }
    return v->get<int64_t>();
  }
  double Number(const std::string& name, double fallback) {
    const json* v = Get(name);
    if (!v) return fallback;
    if (!v->is_number()) Fail(name, "'" + name + "' must be a number, not " + TypeName(*v));
    const double d = v->get<double>();
    if (!std::isfinite(d)) Fail(name, "'" + name + "' must be finite");
    return d;
  }
  // A number the workers take as a 32-bit float: the rule is checked on the float, so a finite
  // double beyond float range (1e39 -> inf) or one that rounds to another class (1e-46 -> 0) is
  // judged as what the workers would see.
  float Float(const std::string& name, double fallback) {
    const double d = Number(name, fallback);
    const float f = static_cast<float>(d);
    if (!std::isfinite(f)) Fail(name, "'" + name + "' is beyond the range of a 32-bit float");
    return f;
  }
  std::string String(const std::string& name, const std::string& fallback) {
    const json* v = Get(name);
    if (!v) return fallback;
    if (!v->is_string()) Fail(name, "'" + name + "' must be a string, not " + TypeName(*v));
    return v->get<std::string>();
  }
  // Unknown fields: an error in strict mode (the default), except the harmless ones; otherwise
  // ignored. A field sent as null counts as absent (OpenAI's clients send them).
  void Finish(const std::string& where) {
    if (!strict_) return;
    for (auto it = obj_.begin(); it != obj_.end(); ++it) {
      if (seen_.count(it.key()) || it->is_null() || IgnoredHarmlessly(it.key())) continue;
      Fail(it.key(),
           "unknown field '" + it.key() + "' in " + where +
               ": this server does not honour it, so it is refused rather than ignored "
               "(--lenient-fields ignores unknown fields)",
           400, "unsupported_field");
    }
  }
  // Fields that change nothing about the answer: identification and bookkeeping for the caller's
  // side (OpenAI's user, metadata, store, service_tier; vLLM's request_id, priority hints).
  static bool IgnoredHarmlessly(const std::string& name) {
    static const std::set<std::string> kHarmless = {
        "user",       "metadata",          "store",           "service_tier",
        "request_id", "safety_identifier", "prompt_cache_key",
        "guided_decoding_backend"};  // which engine enforces structure: this server has one
    return kHarmless.count(name) > 0;
  }

 private:
  const json& obj_;
  bool strict_;
  std::set<std::string> seen_;
};

void CheckModel(Fields& f, const ModelFacts& facts) {
  const std::string model = f.String("model", facts.served_name);
  if (model != facts.served_name) {
    Fail("model",
         "the model '" + model + "' does not exist; this server serves '" + facts.served_name + "'",
         404, "model_not_found");
  }
}

int32_t TokenId(const json& v, const std::string& param, int64_t vocab) {
  if (!v.is_number_integer())
    Fail(param, "token ids must be integers, not " + std::string(TypeName(v)));
  const int64_t id =
      v.is_number_unsigned() && v.get<uint64_t>() > INT64_MAX ? INT64_MAX : v.get<int64_t>();
  if (id < 0 || id >= vocab) {
    Fail(param, "token id " + std::to_string(id) + " is outside the vocabulary [0, " +
                    std::to_string(vocab) + ")");
  }
  return static_cast<int32_t>(id);
}

std::vector<int32_t> TokenList(const json& v, const std::string& param, int64_t vocab) {
  std::vector<int32_t> ids;
  for (const auto& e : v) ids.push_back(TokenId(e, param, vocab));
  if (ids.empty()) Fail(param, "empty prompt: a token list needs at least one id");
  return ids;
}

std::vector<int32_t> EncodeText(const std::string& text, const std::string& param,
                                const ModelFacts& facts, bool add_bos = true) {
  if (text.empty()) Fail(param, "empty prompt");
  if (!facts.tokenizer) {
    Fail(param, "this model has no tokenizer.model: send token ids instead of text");
  }
  auto ids = facts.tokenizer->Encode(text, add_bos);
  if (!ids.ok()) Fail(param, ids.status().message());
  if (ids->empty()) Fail(param, "the prompt encodes to no tokens");
  return *ids;
}

// A prompt or classification input: a string, a list of strings, a list of token ids, or a list
// of lists of token ids.
std::vector<std::vector<int32_t>> Prompts(const json& v, const std::string& param,
                                          const ModelFacts& facts, bool add_bos = true) {
  const int64_t vocab = facts.config->vocab_size;
  std::vector<std::vector<int32_t>> out;
  if (v.is_string()) {
    out.push_back(EncodeText(v.get<std::string>(), param, facts, add_bos));
  } else if (v.is_array()) {
    if (v.empty()) Fail(param, "empty prompt: '" + param + "' is an empty list");
    if (static_cast<int64_t>(v.size()) > facts.limits.max_prompts && !v[0].is_number()) {
      Fail(param, std::to_string(v.size()) + " prompts in one request; the limit is " +
                      std::to_string(facts.limits.max_prompts));
    }
    if (v[0].is_number()) {
      out.push_back(TokenList(v, param, vocab));
    } else {
      for (const auto& e : v) {
        if (e.is_string()) {
          out.push_back(EncodeText(e.get<std::string>(), param, facts, add_bos));
        } else if (e.is_array()) {
          out.push_back(TokenList(e, param, vocab));
        } else {
          Fail(param,
               "'" + param + "' items must be strings or lists of token ids, not " + TypeName(e));
        }
      }
    }
  } else {
    Fail(param,
         "'" + param + "' must be a string, a list of strings or token ids, not " + TypeName(v));
  }
  return out;
}

// Chat messages as the template takes them: text content (a string or text parts), the
// "developer" role as "system" (OpenAI's newer name), a participant's name as "NAME: content",
// an assistant's tool_calls as the model writes calls and a "tool" message as a user turn with
// its call named (serving/tool_calls.h); `tool_prompt` opens the conversation.
std::vector<ChatMessage> ChatMessages(const json& messages, const Limits& limits,
                                      const std::string& tool_prompt = "") {
  const bool strict = limits.strict_fields;
  std::vector<ChatMessage> chat;
  std::vector<bool> from_tool;  // turns a tool message made (merged with their neighbours)
  std::map<std::string, std::string> call_names;  // tool_call_id -> function
  for (const auto& m : messages) {
    Fields mf(m, strict);
    ChatMessage cm;
    cm.role = mf.String("role", "");
    if (cm.role == "developer") cm.role = "system";
    if (cm.role.empty()) Fail("messages", "every message needs a 'role'");
    const json* content = mf.Get("content");
    const json* calls = cm.role == "assistant" ? mf.Get("tool_calls") : nullptr;
    if (!content && !calls) Fail("messages", "every message needs 'content'");
    if (!content) {
    } else if (content->is_string()) {
      cm.content = content->get<std::string>();
    } else if (content->is_array()) {  // [{"type": "text", "text": ...}, ...]
      for (const auto& part : *content) {
        Fields pf(part, strict);
        if (pf.String("type", "") != "text")
          Fail("messages", "only text content parts are supported");
        cm.content += pf.String("text", "");
        pf.Finish("a content part");
      }
    } else {
      Fail("messages", "'content' must be a string or a list of text parts");
    }
    if (calls) {
      auto written = RenderCalls(*calls, call_names);
      if (auto* e = std::get_if<ApiError>(&written)) throw Reject{*e};
      const std::string& text = std::get<std::string>(written);
      if (!text.empty()) cm.content += (cm.content.empty() ? "" : "\n") + text;
    }
    if (cm.role == "tool") {
      const std::string id = mf.String("tool_call_id", "");
      if (id.empty()) Fail("messages", "a tool message needs its 'tool_call_id'");
      cm.role = "user";
      cm.content = ToolResultHeader(id, call_names) + "\n" + cm.content;
    }
    // OpenAI: "an optional name for the participant". Gemma's template has no place for it, so
    // the turn says who speaks: "NAME: content".
    const std::string name = mf.String("name", "");
    if (name.size() > 256 || name.find('\n') != std::string::npos)
      Fail("messages", "a message 'name' must be one line of at most 256 bytes");
    if (!name.empty()) cm.content = name + ": " + cm.content;
    mf.Finish("a message");
    const bool tool = m.value("role", "") == "tool";
    if (!chat.empty() && chat.back().role == cm.role && (tool || from_tool.back())) {
      chat.back().content += "\n\n" + cm.content;  // results of several calls: one user turn
      from_tool.back() = true;
      continue;
    }
    chat.push_back(std::move(cm));
    from_tool.push_back(tool);
  }
  if (!tool_prompt.empty()) {
    if (!chat.empty() && chat[0].role == "system") {
      chat[0].content += "\n\n" + tool_prompt;
    } else {
      chat.insert(chat.begin(), ChatMessage{"system", tool_prompt});
    }
  }
  return chat;
}

void CheckLogprobs(int64_t k, const char* param, const Limits& lim) {
  if (k < 0) Fail(param, std::string("'") + param + "' must be >= 0");
  if (k > lim.max_logprobs) {
    Fail(param, std::string("'") + param + "' is " + std::to_string(k) + "; the limit is " +
                    std::to_string(lim.max_logprobs));
  }
}

// How the chat template ends: vLLM's add_generation_prompt (default true) and
// continue_final_message (default false); both true is refused by the tokenizer.
ChatTemplateOptions TemplateOptions(Fields& f) {
  ChatTemplateOptions o;
  o.add_generation_prompt = f.Bool("add_generation_prompt", true);
  o.continue_final_message = f.Bool("continue_final_message", false);
  if (o.add_generation_prompt && o.continue_final_message) {
    Fail("continue_final_message",
         "'continue_final_message' true needs 'add_generation_prompt' false (as vLLM): the "
         "first continues the last turn, the second opens a new one");
  }
  return o;
}

// Fields shared by completions and chat.
void ParseGeneration(Fields& f, GenerationOptions& g, const ModelFacts& facts) {
  const Limits& lim = facts.limits;
  const int64_t vocab = facts.config->vocab_size;
  g.temperature = f.Float("temperature", 1.0);
  if (g.temperature < 0) Fail("temperature", "'temperature' must be >= 0");
  g.top_p = f.Float("top_p", 1.0);
  if (!(g.top_p > 0 && g.top_p <= 1)) Fail("top_p", "'top_p' must be in (0, 1]");
  g.top_k = f.Int("top_k", -1);
  if (g.top_k < -1) Fail("top_k", "'top_k' must be -1 (off) or >= 0");
  g.min_p = f.Float("min_p", 0.0);
  if (g.min_p < 0 || g.min_p > 1) Fail("min_p", "'min_p' must be in [0, 1]");
  if (const json* s = f.Get("seed")) {
    if (!s->is_number_integer()) Fail("seed", "'seed' must be an integer");
    g.seed =
        s->is_number_unsigned() ? s->get<uint64_t>() : static_cast<uint64_t>(s->get<int64_t>());
  }
  g.presence_penalty = f.Float("presence_penalty", 0.0);
  if (std::abs(g.presence_penalty) > 2)
    Fail("presence_penalty", "'presence_penalty' must be in [-2, 2]");
  g.frequency_penalty = f.Float("frequency_penalty", 0.0);
  if (std::abs(g.frequency_penalty) > 2)
    Fail("frequency_penalty", "'frequency_penalty' must be in [-2, 2]");
  g.repetition_penalty = f.Float("repetition_penalty", 1.0);
  if (!(g.repetition_penalty > 0) || g.repetition_penalty > 10) {
    Fail("repetition_penalty", "'repetition_penalty' must be in (0, 10]");
  }
  if (const json* s = f.Get("stop")) {
    if (s->is_string()) {
      g.stop.push_back(s->get<std::string>());
    } else if (s->is_array()) {
      for (const auto& e : *s) {
        if (!e.is_string()) Fail("stop", "'stop' items must be strings");
        g.stop.push_back(e.get<std::string>());
      }
    } else {
      Fail("stop", "'stop' must be a string or a list of strings");
    }
    if (static_cast<int>(g.stop.size()) > lim.max_stop_strings) {
      Fail("stop", std::to_string(g.stop.size()) + " stop strings; the limit is " +
                       std::to_string(lim.max_stop_strings));
    }
    for (const auto& str : g.stop) {
      if (str.empty()) Fail("stop", "stop strings must not be empty");
      if (str.size() > lim.max_stop_string_bytes) {
        Fail("stop", "a stop string is longer than " + std::to_string(lim.max_stop_string_bytes) +
                         " bytes");
      }
    }
  }
  if (const json* s = f.Get("stop_token_ids")) {
    if (!s->is_array()) Fail("stop_token_ids", "'stop_token_ids' must be a list of token ids");
    for (const auto& e : *s) g.stop_token_ids.push_back(TokenId(e, "stop_token_ids", vocab));
  }
  g.include_stop_str_in_output = f.Bool("include_stop_str_in_output", false);
  g.min_tokens = f.Int("min_tokens", 0);
  if (g.min_tokens < 0) Fail("min_tokens", "'min_tokens' must be >= 0");
  if (const json* b = f.Get("logit_bias")) {  // OpenAI: {"token id": bias in [-100, 100]}
    if (!b->is_object()) Fail("logit_bias", "'logit_bias' must be an object of token id -> bias");
    if (b->size() > static_cast<size_t>(vocab))
      Fail("logit_bias", "'logit_bias' has more entries than the vocabulary");
    for (auto it = b->begin(); it != b->end(); ++it) {
      const std::string& key = it.key();
      const bool digits =
          !key.empty() && key.size() <= 10 &&
          std::all_of(key.begin(), key.end(), [](char c) { return c >= '0' && c <= '9'; });
      if (!digits) Fail("logit_bias", "'logit_bias' keys must be token ids, not '" + key + "'");
      const int32_t id = TokenId(json(std::stoll(key)), "logit_bias", vocab);
      if (!it->is_number()) Fail("logit_bias", "'logit_bias' values must be numbers");
      const double bias = it->get<double>();
      if (!(bias >= -100 && bias <= 100))
        Fail("logit_bias", "'logit_bias' values must be in [-100, 100]");
      g.logit_bias.emplace_back(id, static_cast<float>(bias));
    }
  }
  if (const json* a = f.Get("allowed_token_ids")) {
    if (!a->is_array() || a->empty())
      Fail("allowed_token_ids", "'allowed_token_ids' must be a non-empty list of token ids");
    for (const auto& e : *a) g.allowed_token_ids.push_back(TokenId(e, "allowed_token_ids", vocab));
  }
  if (const json* b = f.Get("bad_words")) {  // vLLM: words the output must never contain
    if (!b->is_array()) Fail("bad_words", "'bad_words' must be a list of strings");
    if (static_cast<int>(b->size()) > lim.max_stop_strings) {
      Fail("bad_words", std::to_string(b->size()) + " bad words; the limit is " +
                            std::to_string(lim.max_stop_strings));
    }
    std::vector<std::string> words;
    for (const auto& e : *b) {
      if (!e.is_string()) Fail("bad_words", "'bad_words' items must be strings");
      const std::string w = e.get<std::string>();
      if (w.find_first_not_of(" \t\n") == std::string::npos)
        Fail("bad_words", "a bad word must hold more than whitespace");
      if (w.size() > lim.max_stop_string_bytes) {
        Fail("bad_words", "a bad word is longer than " +
                              std::to_string(lim.max_stop_string_bytes) + " bytes");
      }
      words.push_back(w);
    }
    if (!words.empty() && !facts.tokenizer)
      Fail("bad_words", "'bad_words' needs the model's tokenizer.model");
    if (!words.empty()) g.bad_words = BadWordSequences(words, *facts.tokenizer);
  }
  g.skip_special_tokens = f.Bool("skip_special_tokens", true);
  if (const json* p = f.Get("prompt_logprobs")) {
    if (!p->is_number_integer()) Fail("prompt_logprobs", "'prompt_logprobs' must be an integer");
    g.prompt_logprobs = static_cast<int>(std::clamp<int64_t>(p->get<int64_t>(), -2, 1 << 20));
    CheckLogprobs(g.prompt_logprobs, "prompt_logprobs", lim);
  }
  g.ignore_eos = f.Bool("ignore_eos", false);
  g.n = static_cast<int>(std::clamp<int64_t>(f.Int("n", 1), -1, 1 << 20));
  if (g.n < 1) Fail("n", "'n' must be >= 1");
  if (g.n > lim.max_n)
    Fail("n", "'n' is " + std::to_string(g.n) + "; the limit is " + std::to_string(lim.max_n));
  g.stream = f.Bool("stream", false);
  if (const json* so = f.Get("stream_options")) {
    Fields o(*so, lim.strict_fields);
    g.include_usage = o.Bool("include_usage", false);
    g.continuous_usage = o.Bool("continuous_usage_stats", false);  // usage in every chunk (vLLM)
    o.Finish("stream_options");
  }
  g.return_token_ids = f.Bool("return_token_ids", false);
  if (g.stream && g.prompt_logprobs >= 0)  // as vLLM: they would come before the first token
    Fail("prompt_logprobs", "'prompt_logprobs' is not available when 'stream' is true");
  ConstraintFields cf;
  cf.response_format = f.Get("response_format");
  cf.structured_outputs = f.Get("structured_outputs");
  cf.guided_json = f.Get("guided_json");
  cf.guided_regex = f.Get("guided_regex");
  cf.guided_choice = f.Get("guided_choice");
  auto constraint = ParseOutputConstraint(cf, facts.constraints.get());
  if (auto* e = std::get_if<ApiError>(&constraint)) throw Reject{*e};
  g.constraint = std::get<std::shared_ptr<const OutputConstraint>>(std::move(constraint));
}

// max_tokens against the context, with both numbers in the message.
void CheckContext(const ParsedRequest& r, const ModelFacts& facts, const char* param) {
  const int64_t context = facts.config->max_position_embeddings;
  for (const auto& p : r.prompts) {
    const int64_t len = static_cast<int64_t>(p.size());
    if (len >= context) {
      Fail("prompt", "the prompt is " + std::to_string(len) + " tokens; this model's context is " +
                         std::to_string(context) + " tokens, which leaves no room to generate");
    }
    if (r.gen.max_tokens > context - len) {  // not len + max_tokens > context: it may overflow
      const bool overflows = r.gen.max_tokens > INT64_MAX - len;
      Fail(param, "this model's context is " + std::to_string(context) + " tokens, but " +
                      std::to_string(len) + " prompt tokens + " + param + " " +
                      std::to_string(r.gen.max_tokens) + " = " +
                      (overflows ? "more than 2^63" : std::to_string(len + r.gen.max_tokens)) +
                      " tokens were requested");
    }
  }
}

int64_t MaxTokens(Fields& f, const char* name, int64_t fallback) {
  const int64_t m = f.Int(name, fallback);
  if (m <= 0) Fail(name, std::string("'") + name + "' must be >= 1");
  return m;
}

// vLLM's truncate_prompt_tokens: each prompt keeps its last k tokens (k >= 1).
void TruncatePrompts(Fields& f, ParsedRequest& r) {
  const int64_t k = f.Int("truncate_prompt_tokens", 0);
  if (f.Get("truncate_prompt_tokens") && k < 1)
    Fail("truncate_prompt_tokens", "'truncate_prompt_tokens' must be >= 1");
  if (k < 1) return;
  for (auto& p : r.prompts) {
    if (static_cast<int64_t>(p.size()) > k) p.erase(p.begin(), p.end() - k);
  }
}

void CheckMinTokens(const GenerationOptions& g, const char* budget) {
  if (g.min_tokens > g.max_tokens) {
    Fail("min_tokens", "'min_tokens' (" + std::to_string(g.min_tokens) + ") exceeds '" + budget +
                           "' (" + std::to_string(g.max_tokens) + ")");
  }
}

void RequireCausal(const ModelFacts& facts, const char* route) {
  if (facts.config->is_classifier()) {
    Fail("model", std::string(ArchitectureName(facts.config->architecture)) +
                      " is a classifier: use /v1/classify, not " + route);
  }
}

template <typename Fn>
ApiResult<ParsedRequest> Guarded(Fn fn) {
  try {
    return fn();
  } catch (const Reject& r) {
    return r.error;
  } catch (const json::exception& e) {  // a type mismatch deep inside a value
    return ApiError{400, std::string("invalid request: ") + e.what()};
  }
}

// The shortest context left by any prompt: the default for chat's max_tokens.
int64_t RestOfContext(const ParsedRequest& r, const ModelFacts& facts) {
  int64_t longest = 0;
  for (const auto& p : r.prompts)
    longest = std::max<int64_t>(longest, static_cast<int64_t>(p.size()));
  return std::max<int64_t>(1, facts.config->max_position_embeddings - longest);
}

}  // namespace

SamplingParams GenerationOptions::Sampling(int choice) const {
  SamplingParams p;
  p.greedy = SamplesGreedily(temperature);  // temperature >= 0 (ParseGeneration)
  p.temperature = p.greedy ? 1.0f : temperature;
  p.top_k = top_k > 0 ? top_k : 0;
  p.top_p = top_p;
  p.seed = seed ? *seed + static_cast<uint64_t>(choice) : 0;
  return p;
}

ApiResult<RequestJson> ParseJsonBody(std::string_view body, int max_depth) {
  if (body.empty()) return ApiError{400, "the request body is empty; send a JSON object"};
  // Nesting is bounded before the parser (and everything after it) recurses through it.
  if (!JsonNestingWithin(body, max_depth)) {
    return ApiError{400, "JSON nested deeper than " + std::to_string(max_depth) + " levels",
                    "invalid_request_error", "", "json_too_deep"};
  }
  try {
    return json::parse(body.begin(), body.end());
  } catch (const json::parse_error& e) {
    std::string what = e.what();
    const bool utf8 = what.find("UTF-8") != std::string::npos;
    return ApiError{400, (utf8 ? "invalid UTF-8 in the JSON body: " : "malformed JSON: ") + what,
                    "invalid_request_error", "", utf8 ? "invalid_utf8" : "invalid_json"};
  } catch (const json::exception& e) {  // e.g. a number too large for a double
    return ApiError{400, std::string("malformed JSON: ") + e.what(), "invalid_request_error", "",
                    "invalid_json"};
  }
}

ApiResult<ParsedRequest> ParseCompletions(const json& body, const ModelFacts& facts) {
  return Guarded([&] {
    Fields f(body, facts.limits.strict_fields);
    CheckModel(f, facts);
    RequireCausal(facts, "/v1/completions");
    ParsedRequest r;
    r.endpoint = Endpoint::kCompletions;
    r.model = facts.served_name;
    const json* prompt = f.Get("prompt");
    if (!prompt) Fail("prompt", "'prompt' is required");
    // Text prompts begin with <bos> unless add_special_tokens is false; token ids go as given.
    r.prompts = Prompts(*prompt, "prompt", facts, f.Bool("add_special_tokens", true));
    TruncatePrompts(f, r);
    ParseGeneration(f, r.gen, facts);
    r.gen.max_tokens = MaxTokens(f, "max_tokens", 16);
    CheckMinTokens(r.gen, "max_tokens");
    if (const json* lp = f.Get("logprobs")) {
      if (!lp->is_number_integer()) Fail("logprobs", "'logprobs' must be an integer (top-k)");
      r.gen.logprobs = static_cast<int>(std::clamp<int64_t>(lp->get<int64_t>(), -1, 1 << 20));
      CheckLogprobs(r.gen.logprobs, "logprobs", facts.limits);
    }
    r.echo = f.Bool("echo", false);  // the prompt's text (and logprobs) in front of each choice's
    if (r.echo_logprobs() && r.gen.stream)  // as vLLM: prompt log-probabilities are not streamed
      Fail("echo", "'echo' with 'logprobs' is not available when 'stream' is true");
    if (r.echo && !facts.tokenizer)
      Fail("echo", "'echo' needs the model's tokenizer.model to give the prompt's text");
    CheckContext(r, facts, "max_tokens");
    f.Finish("a completions request");
    return r;
  });
}

ApiResult<ParsedRequest> ParseChat(const json& body, const ModelFacts& facts) {
  return Guarded([&] {
    Fields f(body, facts.limits.strict_fields);
    CheckModel(f, facts);
    RequireCausal(facts, "/v1/chat/completions");
    if (!facts.tokenizer) Fail("messages", "this model has no tokenizer.model: chat needs one");
    ParsedRequest r;
    r.endpoint = Endpoint::kChat;
    r.model = facts.served_name;
    const json* messages = f.Get("messages");
    if (!messages) Fail("messages", "'messages' is required");
    if (!messages->is_array()) Fail("messages", "'messages' must be a list");
    if (messages->empty()) Fail("messages", "'messages' is empty");
    auto tools = ParseTools(f.Get("tools"), f.Get("tool_choice"), f.Get("parallel_tool_calls"));
    if (auto* e = std::get_if<ApiError>(&tools)) throw Reject{*e};
    const ToolRequest& tr = std::get<ToolRequest>(tools);
    r.tools = tr.use;
    const std::vector<ChatMessage> chat = ChatMessages(*messages, facts.limits, ToolPrompt(tr));
    auto ids = facts.tokenizer->EncodeChat(chat, TemplateOptions(f));
    if (!ids.ok()) Fail("messages", ids.status().message());
    r.prompts.push_back(*ids);
    if (f.Bool("add_special_tokens", false))  // vLLM's default for chat: the template has them
      Fail("add_special_tokens", "the chat template already begins with <bos>: add_special_tokens "
                                 "must be false for chat");
    TruncatePrompts(f, r);
    ParseGeneration(f, r.gen, facts);
    r.chat_logprobs = f.Bool("logprobs", false);
    const int64_t top = f.Int("top_logprobs", 0);
    CheckLogprobs(top, "top_logprobs", facts.limits);
    if (top > 0 && !r.chat_logprobs) Fail("top_logprobs", "'top_logprobs' needs 'logprobs': true");
    if (r.chat_logprobs) r.gen.logprobs = static_cast<int>(top);
    // Newer clients send max_completion_tokens, older ones max_tokens; default: the rest of the
    // context.
    const char* budget = f.Get("max_completion_tokens") ? "max_completion_tokens" : "max_tokens";
    f.Ignore("max_tokens");
    r.gen.max_tokens = MaxTokens(f, budget, RestOfContext(r, facts));
    CheckMinTokens(r.gen, budget);
    CheckContext(r, facts, budget);
    if (r.tools.forced()) {  // the reply is the calls: constrained to their schemas
      if (r.gen.constraint)
        Fail("tool_choice", "tool_choice '" +
                                std::string(r.tools.choice == ToolUse::Choice::kNamed ? "named" : "required") +
                                "' and a response format both constrain the reply; give one");
      auto calls = ToolCallConstraint(
          tr.callable, tr.parallel && r.tools.choice == ToolUse::Choice::kRequired,
          facts.constraints.get());
      if (auto* e = std::get_if<ApiError>(&calls)) throw Reject{*e};
      r.gen.constraint = std::get<std::shared_ptr<const OutputConstraint>>(std::move(calls));
    }
    f.Finish("a chat request");
    return r;
  });
}

ApiResult<ParsedRequest> ParseClassify(const json& body, const ModelFacts& facts) {
  return Guarded([&] {
    Fields f(body, facts.limits.strict_fields);
    CheckModel(f, facts);
    if (!facts.config->is_classifier()) {
      Fail("model",
           "Gemma2ForCausalLM has no classification head: /v1/classify needs a "
           "Gemma2ForSequenceClassification or Gemma2ForTokenClassification checkpoint");
    }
    ParsedRequest r;
    r.endpoint = Endpoint::kClassify;
    r.model = facts.served_name;
    const json* input = f.Get("input");
    if (!input) Fail("input", "'input' is required");
    r.prompts = Prompts(*input, "input", facts);
    const int64_t context = facts.config->max_position_embeddings;
    for (const auto& p : r.prompts) {
      if (static_cast<int64_t>(p.size()) > context) {
        Fail("input", "an input is " + std::to_string(p.size()) +
                          " tokens; this model's context is " + std::to_string(context) +
                          " tokens");
      }
    }
    f.Finish("a classify request");
    return r;
  });
}

ApiResult<nlohmann::json> ParseTokenize(const json& body, const ModelFacts& facts) {
  try {
    Fields f(body, facts.limits.strict_fields);
    CheckModel(f, facts);
    if (!facts.tokenizer) Fail("prompt", "this model has no tokenizer.model");
    std::vector<int32_t> ids;
    const json* messages = f.Get("messages");
    if (messages) {
      if (!messages->is_array() || messages->empty())
        Fail("messages", "'messages' must be a non-empty list");
      auto r = facts.tokenizer->EncodeChat(ChatMessages(*messages, facts.limits),
                                           TemplateOptions(f));
      if (!r.ok()) Fail("messages", r.status().message());
      ids = std::move(r).value();
    } else {
      const json* prompt = f.Get("prompt");
      if (!prompt || !prompt->is_string())
        Fail("prompt", "'prompt' (a string) or 'messages' is required");
      const bool special = f.Bool("add_special_tokens", true);  // <bos> first, as vLLM
      auto r = facts.tokenizer->Encode(prompt->get<std::string>(), special);
      if (!r.ok()) Fail("prompt", r.status().message());
      ids = std::move(r).value();
    }
    if (f.Bool("return_token_strs", false))
      Fail("return_token_strs", "return_token_strs is not supported");
    f.Finish("a tokenize request");
    return nlohmann::json{{"count", ids.size()},
                {"max_model_len", facts.config->max_position_embeddings},
                {"tokens", ids}};
  } catch (const Reject& r) {
    return r.error;
  } catch (const json::exception& e) {
    return ApiError{400, std::string("invalid request: ") + e.what()};
  }
}

ApiResult<nlohmann::json> ParseDetokenize(const json& body, const ModelFacts& facts) {
  try {
    Fields f(body, facts.limits.strict_fields);
    CheckModel(f, facts);
    if (!facts.tokenizer) Fail("tokens", "this model has no tokenizer.model");
    const json* tokens = f.Get("tokens");
    if (!tokens || !tokens->is_array())
      Fail("tokens", "'tokens' (a list of token ids) is required");
    std::vector<int32_t> ids;
    for (const auto& t : *tokens) ids.push_back(TokenId(t, "tokens", facts.config->vocab_size));
    f.Finish("a detokenize request");
    auto text = facts.tokenizer->Decode(ids);
    if (!text.ok()) Fail("tokens", text.status().message());
    return nlohmann::json{{"prompt", *text}};
  } catch (const Reject& r) {
    return r.error;
  } catch (const json::exception& e) {
    return ApiError{400, std::string("invalid request: ") + e.what()};
  }
}

}  // namespace gemma2::serving
