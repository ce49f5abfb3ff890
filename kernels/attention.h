// Causal attention of each new token over its sequence's paged cache, with Gemma 2's features:
// GQA, scores × scale, softcap, per-layer sliding window (key k visible from query q iff
// q - window < k <= q; window 0: full), softmax in fp32 (online). Twin of CpuBackend::Attention.
// head_dim 128 and 256 only (Gemma 2's); anything else returns cudaErrorInvalidValue.
#pragma once

#include <cstddef>

#include "kernels/paged_kv.h"

namespace gemma2::kernels {

struct AttentionShape {
  int32_t q_heads = 0, kv_heads = 0, head_dim = 0;
  float scale = 0, softcap = 0;
  int32_t window = 0;
};

inline constexpr int kMaxAttentionSplits = 32;

// Each (token, kv head)'s keys are split across this many blocks (decode: many; prefill: one),
// merged by a second kernel; a split takes at least 256 keys, so short contexts use fewer.
// Depends only on the step's shape and the bucket of its longest context (`max_context`: the
// largest position + 1), so a graph captured for one bucket stays valid for all of it.
int AttentionSplits(int64_t tokens, const AttentionShape& shape, int64_t max_context);
int AttentionContextBucket(int64_t max_context);
// Scratch the split partials need (0 when there is one split).
size_t AttentionPartialBytes(int64_t tokens, const AttentionShape& shape, int64_t max_context);

// q: rows of qkv (q heads first, row_stride elements apart); out: [tokens, q_heads * head_dim];
// partial: AttentionPartialBytes of fp32 scratch.
cudaError_t PagedAttention(const bf16* q, int64_t row_stride, const StepTokens& tokens,
                           int64_t max_context, const AttentionShape& shape, const PagedKv& kv,
                           float* partial, bf16* out, cudaStream_t stream);

}  // namespace gemma2::kernels
