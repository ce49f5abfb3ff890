#include "model/sampling.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <vector>

#include "common/sampling_noise.h"

namespace gemma2 {

Status SamplingParams::Validate() const {
  if (greedy) return OkStatus();
  if (!(temperature > 0) || !std::isfinite(temperature)) {
    return InvalidArgument("temperature must be a positive finite number");
  }
  if (top_k < 0) return InvalidArgument("top_k must be >= 0 (0 turns it off)");
  if (!(top_p > 0 && top_p <= 1)) return InvalidArgument("top_p must be in (0, 1]");
  return OkStatus();
}

int32_t SampleRow(std::span<const float> logits, const RowSampling& s) {
  const int64_t n = static_cast<int64_t>(logits.size());
  const SamplingParams& p = s.params;
  if (p.greedy) return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
  std::vector<float> v(logits.begin(), logits.end());
  for (float& x : v) x /= p.temperature;
  std::vector<float> sorted = v;
  std::sort(sorted.begin(), sorted.end(), std::greater<float>());
  float tau = -INFINITY;
  if (p.top_k > 0 && p.top_k < n) tau = sorted[static_cast<size_t>(p.top_k - 1)];
  if (p.top_p < 1.0f) {
    double z = 0;
    for (float x : sorted) z += std::exp(static_cast<double>(x) - sorted[0]);
    double cum = 0;
    for (int64_t i = 0; i < n; ++i) {
      cum += std::exp(static_cast<double>(sorted[i]) - sorted[0]);
      // Mass of "all values >= sorted[i]" counts the whole tie group of sorted[i].
      if (i + 1 < n && sorted[i + 1] == sorted[i]) continue;
      if (cum >= p.top_p * z) {
        tau = std::max(tau, sorted[i]);
        break;
      }
    }
  }
  int64_t best = -1;
  float best_score = -INFINITY;
  for (int64_t j = 0; j < n; ++j) {
    if (v[j] < tau) continue;
    const float score = v[j] + GumbelNoise(p.seed, s.counter, static_cast<uint64_t>(j));
    if (best < 0 || score > best_score) {
      best = j;
      best_score = score;
    }
  }
  return static_cast<int32_t>(best);
}

}  // namespace gemma2
