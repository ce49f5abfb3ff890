// Decode-time projections (a few tokens): out[t][n] = sum_k x[t][k] * w[n][k], bf16 in, fp32
// accumulate, bf16 or fp32 out. Memory-bound: one warp streams one weight row with 16-byte loads
// that bypass L1; the few token rows stay hot in L2. Twin of CpuBackend::Linear (no bias).
#pragma once

#include "kernels/types.h"

namespace gemma2::kernels {

inline constexpr int64_t kGemvMaxTokens = 4;

// True when Gemv can run this shape: 1 <= tokens <= kGemvMaxTokens, k % 8 == 0, 16-byte aligned.
bool GemvSupports(const void* x, const void* w, int64_t tokens, int64_t k);

cudaError_t Gemv(const bf16* x, const bf16* w, void* out, bool out_f32, int64_t tokens, int64_t n,
                 int64_t k, cudaStream_t stream);

}  // namespace gemma2::kernels
