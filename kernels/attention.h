// Causal attention of each new token over its sequence's paged cache, with Gemma 2's features:
// GQA, scores × scale, softcap, per-layer sliding window (key k visible from query q iff
// q - window < k <= q; window 0: full), softmax in fp32 (online). Twin of CpuBackend::Attention.
// head_dim 128 and 256 only (Gemma 2's); anything else returns cudaErrorInvalidValue.
#pragma once

#include "kernels/paged_kv.h"

namespace gemma2::kernels {

struct AttentionShape {
  int32_t q_heads = 0, kv_heads = 0, head_dim = 0;
  float scale = 0, softcap = 0;
  int32_t window = 0;
};

// q: rows of qkv (q heads first, row_stride elements apart); out: [tokens, q_heads * head_dim].
cudaError_t PagedAttention(const bf16* q, int64_t row_stride, const StepTokens& tokens,
                           const AttentionShape& shape, const PagedKv& kv, bf16* out,
                           cudaStream_t stream);

}  // namespace gemma2::kernels
