// RoPE frequencies, shared by every backend so they use identical fp32 values.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

namespace gemma2 {

// inv_freq[i] = 1 / theta^(2i / d) in fp32, as transformers computes it (never rounded to bf16).
inline std::vector<float> RopeInvFreq(int64_t head_dim, double theta) {
  std::vector<float> f(static_cast<size_t>(head_dim / 2));
  for (int64_t i = 0; i < head_dim / 2; ++i) {
    const float e = static_cast<float>(2 * i) / static_cast<float>(head_dim);
    f[static_cast<size_t>(i)] = 1.0f / std::pow(static_cast<float>(theta), e);
  }
  return f;
}

}  // namespace gemma2
