// Choosing the next token from a row of logits, on the host (the cuda backend samples on device).
#pragma once

#include <cstdint>
#include <random>
#include <span>

#include "common/status.h"

namespace gemma2 {

struct SamplingParams {
  bool greedy = true;        // argmax; the other fields are ignored
  float temperature = 1.0f;  // > 0
  int64_t top_k = 0;         // 0: off
  float top_p = 1.0f;        // (0, 1]
  uint64_t seed = 0;
  Status Validate() const;
};

// Greedy: the first index of the maximum (torch.argmax's choice on ties). Otherwise, as
// transformers' warpers in order: temperature, top-k, top-p (smallest set of most likely tokens
// whose probability reaches top_p; at least one), then a draw from `rng`.
int32_t SampleToken(std::span<const float> logits, const SamplingParams& p, std::mt19937_64& rng);

}  // namespace gemma2
