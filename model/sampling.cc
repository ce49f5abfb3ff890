#include "model/sampling.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

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

int32_t SampleToken(std::span<const float> logits, const SamplingParams& p, std::mt19937_64& rng) {
  const int64_t n = static_cast<int64_t>(logits.size());
  if (p.greedy) {
    int64_t best = 0;
    for (int64_t i = 1; i < n; ++i) {
      if (logits[i] > logits[best]) best = i;
    }
    return static_cast<int32_t>(best);
  }
  std::vector<int32_t> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
  int64_t keep = n;
  if (p.top_k > 0) keep = std::min(keep, p.top_k);
  std::vector<double> prob(static_cast<size_t>(keep));
  const double max_l = logits[order[0]] / p.temperature;
  double total = 0;
  for (int64_t i = 0; i < keep; ++i) {
    prob[i] = std::exp(logits[order[i]] / p.temperature - max_l);
    total += prob[i];
  }
  if (p.top_p < 1.0f) {
    double cum = 0;
    int64_t cut = keep;
    for (int64_t i = 0; i < keep; ++i) {
      cum += prob[i] / total;
      if (cum >= p.top_p) {
        cut = i + 1;
        break;
      }
    }
    keep = cut;
    prob.resize(static_cast<size_t>(keep));
  }
  std::discrete_distribution<int64_t> dist(prob.begin(), prob.end());
  return order[static_cast<size_t>(dist(rng))];
}

}  // namespace gemma2
