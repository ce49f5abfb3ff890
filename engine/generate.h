// Batched generation and classification on top of an Engine: the offline runner's loop.
#pragma once

#include <string>
#include <vector>

#include "model/step_executor.h"
#include "model/sampling.h"

namespace gemma2 {

struct GenerationRequest {
  std::vector<int32_t> prompt;
  int64_t max_new_tokens = 16;
  SamplingParams sampling;
  bool ignore_eos = false;
  bool return_logits = false;  // one row per prompt position, then per generated token but the last
};

struct GenerationResult {
  std::vector<int32_t> generated;
  std::string finish_reason;  // "stop" (an end-of-sequence token) or "length"
  std::vector<std::vector<float>> logits;
};

// Runs all requests as one batch: a ragged prefill, then one decode step per token with finished
// sequences leaving the batch.
Result<std::vector<GenerationResult>> Generate(StepExecutor& engine,
                                               const std::vector<GenerationRequest>& requests);

struct ClassificationResult {
  std::vector<std::vector<float>> logits;  // sequence: one row; token: one row per token
  std::vector<std::string> labels;         // argmax label of each row
};

// Sequence classifiers score the last non-pad token (the first token when all are pad, as
// transformers does); token classifiers score every token.
Result<ClassificationResult> Classify(StepExecutor& engine, const std::vector<int32_t>& tokens);

}  // namespace gemma2
