// OpenAI response bodies and server-sent-event chunks, built from a RequestHandle's state.
// Callers hold the handle's mutex while calling these.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "model/config.h"
#include "model/tokenizer.h"
#include "serving/request_handle.h"
#include "serving/tool_calls.h"

namespace gemma2::serving {

struct ResponseContext {
  std::string id;  // "cmpl-…", "chatcmpl-…", "classify-…"
  int64_t created = 0;
  std::string model;
  const Tokenizer* tokenizer = nullptr;
  const ModelConfig* config = nullptr;
};

nlohmann::json ErrorBody(const ApiError& e);
// Each reads the handle's state: the caller holds h.mu.
nlohmann::json CompletionBody(const ResponseContext& ctx, const RequestHandle& h) REQUIRES(h.mu);
nlohmann::json ChatBody(const ResponseContext& ctx, const RequestHandle& h) REQUIRES(h.mu);
nlohmann::json ClassifyBody(const ResponseContext& ctx, const RequestHandle& h) REQUIRES(h.mu);

// What a stream has sent so far, per choice.
struct StreamCursor {
  std::vector<size_t> text_bytes, tokens;
  std::vector<bool> started, finished;
  std::vector<ToolCallStream> calls;  // per choice: calls streamed as written (forced calls)
};

// "data: {...}\n\n" events for everything new since `cursor` (updated), in OpenAI's chunk format
// for completions or chat.
std::string StreamEvents(const ResponseContext& ctx, const RequestHandle& h, StreamCursor& cursor)
    REQUIRES(h.mu);
// The closing usage chunk (stream_options.include_usage).
std::string UsageEvent(const ResponseContext& ctx, const RequestHandle& h) REQUIRES(h.mu);

}  // namespace gemma2::serving
