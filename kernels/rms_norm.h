// Gemma RMSNorm in fp32 with weight (1 + w), and the fused residual step between blocks.
// Twins of CpuBackend::RmsNorm and CpuBackend::AddRmsNorm.
#pragma once

#include "kernels/types.h"

namespace gemma2::kernels {

// out = x / sqrt(mean(x^2) + eps) * (1 + w), per row.
cudaError_t RmsNorm(const bf16* x, const bf16* w, int64_t rows, int64_t hidden, float eps,
                    bf16* out, cudaStream_t stream);

// residual += bf16(RmsNorm(delta, post_w)); then, if next_w: normed = RmsNorm(residual, next_w).
// Rounds where transformers' bf16 model rounds: the post-norm output, then the sum.
// hidden <= 8192 (Gemma 2: 2304, 3584, 4608); larger returns cudaErrorInvalidValue.
cudaError_t AddRmsNorm(bf16* residual, const bf16* delta, const bf16* post_w, const bf16* next_w,
                       int64_t rows, int64_t hidden, float eps, bf16* normed, cudaStream_t stream);

}  // namespace gemma2::kernels
