// RoPE fused with the KV-cache write. Twin of CpuBackend::RopeAndCacheWrite.
#pragma once

#include "kernels/paged_kv.h"

namespace gemma2::kernels {

// qkv rows: [q (q_heads*hd) | k (kv_heads*hd) | v (kv_heads*hd)]. Rotates q and k in place
// (rotate-half, angle = pos * inv_freq[i] in fp32, full-precision sincosf) and writes k, v into
// the cache at each token's position. inv_freq has head_dim / 2 entries. An FP8 cache (kv.k8)
// takes each k and v head rounded through E4M3 with its own scale, and the rows keep the rounded
// values (a fresh prefill's attention reads them from qkv).
cudaError_t RopeAndCacheWrite(bf16* qkv, int64_t row_stride, const StepTokens& tokens,
                              int32_t q_heads, int32_t kv_heads, int32_t head_dim,
                              const float* inv_freq, const PagedKv& kv, cudaStream_t stream);

}  // namespace gemma2::kernels
