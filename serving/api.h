// The OpenAI-compatible API's request model: what a parsed, validated request asks for, and the
// error every rejection carries. Parsing (serving/request_parser.h) turns JSON into these; the
// scheduler (serving/scheduler.h) runs them; nothing here knows about HTTP.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "model/sampling.h"

namespace gemma2::serving {

// OpenAI's error body {"error": {"message", "type", "param", "code"}} plus the HTTP status.
struct ApiError {
  int http_status = 400;
  std::string message;
  std::string type = "invalid_request_error";
  std::string param;  // the offending field ("" when none)
  std::string code;   // machine-readable ("" when none)
};

// A 400 invalid_request_error naming `param`.
inline ApiError BadRequest(std::string param, std::string message, std::string code = "") {
  return ApiError{400, std::move(message), "invalid_request_error", std::move(param), std::move(code)};
}

// How deep JSON held inside a string may nest (a schema sent as a string, a tool call's
// arguments, a model's reply read as calls): parsed with this bound, as the body is, since a
// deeper value would exhaust the stack of the parser and of every walk over it.
inline constexpr int kMaxEmbeddedJsonDepth = 32;

// Caps that bound what one request may ask for (server flags).
struct Limits {
  size_t max_body_bytes = 4 << 20;
  int max_json_depth = 32;
  int max_n = 16;
  int max_logprobs = 20;
  int max_stop_strings = 16;
  size_t max_stop_string_bytes = 256;
  int max_prompts = 1024;      // batched prompts in one request
  // A field this server does not honour is a 400 naming it (OpenAI's answer to an unrecognized
  // argument), except those on the allow-list of fields harmless to ignore (request_parser.cc);
  // false (--lenient-fields): every unknown field is ignored.
  bool strict_fields = true;
};

struct OutputConstraint;  // serving/output_constraints.h

// How the tokens of one choice are picked. Temperature 0 means greedy.
struct GenerationOptions {
  int64_t max_tokens = 16;
  float temperature = 1.0f;
  float top_p = 1.0f;
  int64_t top_k = -1;  // -1 or 0: off
  float min_p = 0.0f;
  std::optional<uint64_t> seed;
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  float repetition_penalty = 1.0f;
  std::vector<std::string> stop;
  std::vector<int32_t> stop_token_ids;
  bool include_stop_str_in_output = false;
  bool ignore_eos = false;
  int64_t min_tokens = 0;  // EOS and stop_token_ids are suppressed until this many were generated
  std::vector<std::pair<int32_t, float>> logit_bias;  // added to the token's logit, [-100, 100]
  std::vector<int32_t> allowed_token_ids;             // non-empty: only these may be drawn
  std::vector<std::vector<int32_t>> bad_words;        // token sequences never completed
  bool skip_special_tokens = true;  // false: <eos>, turn markers... appear in the text
  int n = 1;
  int logprobs = -1;  // -1: none; k >= 0: the chosen token's log-probability and the top k
  // -1: none; k >= 0: each prompt token's log-probability (given the tokens before it) and the
  // top k there (vLLM's prompt_logprobs).
  int prompt_logprobs = -1;
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage
  bool continuous_usage = false;  // stream_options.continuous_usage_stats: usage in every chunk
  bool return_token_ids = false;
  // Structured output: the grammar every choice follows (null: free text).
  std::shared_ptr<const OutputConstraint> constraint;

  // Penalties, min_p, biases, token limits and log-probabilities need the logits row on the
  // coordinator. (Structured output does not: its masks go to the ranks with the step.)
  bool needs_logits() const {
    return logprobs >= 0 || presence_penalty != 0 || frequency_penalty != 0 ||
           repetition_penalty != 1 || min_p > 0 || min_tokens > 0 || !logit_bias.empty() ||
           !allowed_token_ids.empty() || !bad_words.empty();
  }
  // The sampler's parameters for one choice; choices of one seeded request draw from seed + index.
  SamplingParams Sampling(int choice) const;
};

enum class Endpoint { kCompletions, kChat, kClassify };

// Tool calling (chat): which functions the reply may call and how (OpenAI's tool_choice).
struct ToolUse {
  enum class Choice : uint8_t { kNone, kAuto, kRequired, kNamed };
  Choice choice = Choice::kNone;
  std::vector<std::string> names;  // the functions the reply may call
  // Finished replies are read as calls (finish_reason "tool_calls") where they are calls.
  bool parses() const { return choice != Choice::kNone && !names.empty(); }
  // The reply is constrained to calls: streamed once complete, as calls.
  bool forced() const { return choice == Choice::kRequired || choice == Choice::kNamed; }
};

// One validated request: its prompts already as token ids.
struct ParsedRequest {
  Endpoint endpoint = Endpoint::kCompletions;
  std::string model;
  std::vector<std::vector<int32_t>> prompts;  // completions/classify: one or many; chat: one
  GenerationOptions gen;
  bool chat_logprobs = false;  // chat: `logprobs: true` (top_logprobs in gen.logprobs)
  bool echo = false;           // completions: the prompt's text in front of each choice's text
  ToolUse tools;               // chat
  // completions with echo and logprobs: the prompt's tokens lead the logprobs (the first null).
  bool echo_logprobs() const { return echo && gen.logprobs >= 0; }
  // The top-k each prompt position's log-probabilities need (-1: the prompt needs none).
  int prompt_top() const { return std::max(gen.prompt_logprobs, echo_logprobs() ? gen.logprobs : -1); }
};

}  // namespace gemma2::serving
