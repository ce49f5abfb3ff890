// Structured output as requests ask for it: OpenAI's response_format, vLLM's structured_outputs
// and guided_* fields, and the calls of tool_choice required or named, each turned into a grammar
// (structured/json_schema.h) and the token masker the scheduler applies at every step.
#pragma once

#include <cstddef>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <unordered_map>
#include <variant>
#include <vector>

#include "common/mutex.h"
#include "model/tokenizer.h"
#include "serving/api.h"
#include "structured/grammar.h"
#include "structured/json_schema.h"
#include "structured/token_masker.h"

namespace gemma2::serving {

// What one request's output must follow. Shared by every request that asks for the same
// specification; the masker keeps the masks of the states met so far, so a schema's second
// request finds most of them computed.
struct OutputConstraint {
  std::string kind;  // "json_object", "json_schema", "regex", "choice", "tool_calls"
  std::shared_ptr<const structured::Grammar> grammar;
  structured::State start;  // where every choice starts (checked when compiled)
  // Called by the scheduler thread only (the masker's caches are not locked).
  std::shared_ptr<structured::TokenMasker> masker;
};

// A choice's place in its constraint's grammar.
class ConstraintState {
 public:
  explicit ConstraintState(std::shared_ptr<const OutputConstraint> c)
      : c_(std::move(c)), state_(c_->start) {}
  // The tokens allowed next (stop ids where the structure is complete). Scheduler thread only.
  void Allowed(structured::TokenMask& mask) const { c_->masker->Allowed(state_, mask); }
  // Moves past `token`'s bytes; false when they break the structure (the mask allowed them, so
  // that is a bug, reported as such).
  bool Advance(int32_t token);
  // The structure is complete and nothing may follow: the choice ends here.
  bool Finished() const { return state_.size() == 1 && state_.front().empty(); }
  const OutputConstraint& constraint() const { return *c_; }
  // Two choices in the same place of the same grammar allow the same tokens.
  bool SamePlace(const ConstraintState& o) const { return c_ == o.c_ && state_ == o.state_; }

 private:
  std::shared_ptr<const OutputConstraint> c_;
  structured::State state_;
  structured::State next_;  // scratch
};

// Compiled constraints by specification, the least recently used dropped past `capacity`. A
// masker holds at most 16 MB of masks and 32 MB of transitions (token_masker.h), so the cache
// bounds structured output's memory at about capacity x 48 MB.
class ConstraintCache {
 public:
  // `stop_ids`: the model's end-of-sequence tokens (allowed where the structure is complete).
  ConstraintCache(const Tokenizer& tokenizer, std::vector<int32_t> stop_ids, size_t capacity = 16);
  using Compile = std::function<Result<std::shared_ptr<const structured::Grammar>>()>;
  // The constraint of `kind` whose specification is `key`, compiled by `compile` on a miss.
  Result<std::shared_ptr<const OutputConstraint>> Get(const std::string& kind,
                                                      const std::string& key,
                                                      const Compile& compile) EXCLUDES(mu_);
  size_t size() const EXCLUDES(mu_);

 private:
  const Tokenizer& tokenizer_;
  std::vector<int32_t> stop_ids_;
  size_t capacity_;
  std::once_flag vocab_once_;
  std::shared_ptr<const structured::TokenVocabulary> vocab_;  // built at the first request
  mutable Mutex mu_;
  struct Entry {
    std::shared_ptr<const OutputConstraint> constraint;
    std::list<std::string>::iterator age;
  };
  std::unordered_map<std::string, Entry> entries_ GUARDED_BY(mu_);
  std::list<std::string> ages_ GUARDED_BY(mu_);  // keys, most recently used first
};

// The request fields that ask for structure, as read from the body (null: absent).
struct ConstraintFields {
  const nlohmann::ordered_json* response_format = nullptr;
  const nlohmann::ordered_json* structured_outputs = nullptr;
  const nlohmann::ordered_json* guided_json = nullptr;
  const nlohmann::ordered_json* guided_regex = nullptr;
  const nlohmann::ordered_json* guided_choice = nullptr;
};

// The constraint those fields ask for (null when none does); a field this server cannot honour,
// two that ask for structure at once, or a schema keyword outside the supported subset is a 400
// naming it. `cache` null: the model has no tokenizer, so any structure is refused.
std::variant<std::shared_ptr<const OutputConstraint>, ApiError> ParseOutputConstraint(
    const ConstraintFields& fields, ConstraintCache* cache);

// The calls of tool_choice "required" (one or, with parallel calls, a list) or a named function.
std::variant<std::shared_ptr<const OutputConstraint>, ApiError> ToolCallConstraint(
    const std::vector<structured::ToolSchema>& tools, bool list, ConstraintCache* cache);

}  // namespace gemma2::serving
