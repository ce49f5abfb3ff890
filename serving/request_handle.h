// One request's state, shared by the HTTP session that waits on it and the scheduler that fills
// it. The scheduler appends under `mu` and then calls `notify`; the session reads what is new.
#pragma once

#include <nlohmann/json.hpp>

#include <atomic>
#include <chrono>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "common/mutex.h"
#include "serving/api.h"
#include "serving/logits_processing.h"

namespace gemma2::serving {

using Clock = std::chrono::steady_clock;

// One generated choice as released so far: text never ends inside a UTF-8 character or a
// possible stop string; token_ids and logprobs run ahead of text by what is held back.
struct ChoiceProgress {  // NOLINT(bugprone-exception-escape): members' allocation only
  std::string text;
  std::vector<int32_t> token_ids;
  std::vector<TokenLogprobs> logprobs;  // one per token when asked for
  std::string finish_reason;            // "" while running; then "stop", "length" or "tool_calls"
  // finish_reason "tool_calls": the calls the text holds, in OpenAI's form ([{id, type:
  // "function", function: {name, arguments}}], arguments a JSON string); null otherwise.
  nlohmann::json tool_calls;
  // What stopped it (vLLM's stop_reason): the matched stop string or stop token id; null for
  // EOS and length.
  nlohmann::json stop_reason;
};

// One classification input: one row (sequence classifier) or one row per token.
struct ClassifiedInput {
  std::vector<std::vector<float>> logits;
};

class RequestHandle {
 public:
  RequestHandle(std::string id, ParsedRequest request)
      : id_(std::move(id)), request_(std::move(request)), arrival_(Clock::now()) {}
  const std::string& id() const { return id_; }
  const ParsedRequest& request() const { return request_; }
  Clock::time_point arrival() const { return arrival_; }

  // The session's side: asks the scheduler to drop this request at its next step.
  void Cancel() { cancelled_.store(true); }
  bool cancelled() const { return cancelled_.load(); }

  // What the scheduler produced, read by the session.
  Mutex mu;
  std::vector<ChoiceProgress> choices GUARDED_BY(mu);  // generation: prompts x n, OpenAI's order
  std::vector<ClassifiedInput> classified GUARDED_BY(mu);  // classification: one per input
  // Per prompt, when asked (ParsedRequest::prompt_top): the log-probabilities of its tokens 1..
  // (token 0 has none), set once the prompt was prefilled.
  std::vector<std::vector<TokenLogprobs>> prompt_logprobs GUARDED_BY(mu);
  std::optional<ApiError> error GUARDED_BY(mu);  // set once: the request failed
  bool done GUARDED_BY(mu) = false;              // every choice finished (or error set)
  int64_t prompt_tokens GUARDED_BY(mu) = 0;
  int64_t completion_tokens GUARDED_BY(mu) = 0;
  // When the first token of any choice came.
  std::optional<Clock::time_point> first_token_at GUARDED_BY(mu);
  // Set by the session before submitting; called by the scheduler after each update.
  std::function<void()> notify;
  // Counted in the request metrics (the launcher's readiness probe is not).
  bool counted = true;

 private:
  std::string id_;
  ParsedRequest request_;
  Clock::time_point arrival_;
  std::atomic<bool> cancelled_{false};
};

}  // namespace gemma2::serving
