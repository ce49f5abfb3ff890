// Choosing the next token from a row of logits. SampleRow is the specification every backend's
// on-device sampler reproduces (cpu: this function; cuda: kernels/sample.cu).
#pragma once

#include <cstdint>
#include <span>

#include "common/status.h"

namespace gemma2 {

// Temperatures in (0, kMinSamplingTemperature) sample greedily, as vLLM's do: logits / 1e-40 would
// overflow a float, and at such temperatures the draw is the argmax but for near-exact ties.
inline constexpr float kMinSamplingTemperature = 1e-5f;
inline bool SamplesGreedily(float temperature) { return temperature < kMinSamplingTemperature; }

struct SamplingParams {
  bool greedy = true;        // argmax; the other fields are ignored
  float temperature = 1.0f;  // > 0
  int64_t top_k = 0;         // 0: off
  float top_p = 1.0f;        // (0, 1]
  uint64_t seed = 0;
  Status Validate() const;
};

// One row's sampling request: the parameters and which draw of the request this is.
struct RowSampling {
  SamplingParams params;
  uint64_t counter = 0;  // the request's draw index (tokens generated so far)
};

// Greedy: the first index of the maximum (torch.argmax's choice on ties).
// Otherwise, with v = logits / temperature: keep every token with v >= tau, tau the largest value
// such that at least top_k values are >= tau (top_k > 0) and their softmax mass is >= top_p
// (top_p < 1; ties at tau all kept); return the kept token maximizing v + GumbelNoise(seed,
// counter, token) — an exact draw from softmax(v) restricted to the kept tokens (Gumbel-max).
int32_t SampleRow(std::span<const float> logits, const RowSampling& s);

}  // namespace gemma2
