// Decode-time projections for a few dozen tokens through tensor cores: out[t][n] = sum_k x[t][k] *
// w[n][k], bf16 in, fp32 accumulate, bf16 or fp32 out. Memory-bound like Gemv, but 16 tokens'
// worth of FMAs per weight would outrun the CUDA cores: each warp feeds mma.sync with 32 weight
// rows read by 16-byte streaming loads, against every token at once. K is split over the warps
// of a block and, for narrow outputs, over blocks (partials summed in a fixed order: the result is
// deterministic). Twin of CpuBackend::Linear (no bias).
#pragma once

#include <cstddef>

#include "kernels/types.h"

namespace gemma2::kernels {

inline constexpr int64_t kSkinnyMaxTokens = 32;

// True when SkinnyGemm can run this shape: 1 <= tokens <= kSkinnyMaxTokens, k % 32 == 0, x and w
// 16-byte aligned.
bool SkinnyGemmSupports(const void* x, const void* w, int64_t tokens, int64_t k);

// fp32 scratch one call needs (0: none); depends only on the shape, so graphs stay valid.
size_t SkinnyGemmScratchBytes(int64_t tokens, int64_t n, int64_t k);

cudaError_t SkinnyGemm(const bf16* x, const bf16* w, void* out, bool out_f32, int64_t tokens,
                       int64_t n, int64_t k, float* scratch, cudaStream_t stream);

}  // namespace gemma2::kernels
