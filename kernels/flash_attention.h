// Fused attention of a fresh prefill (every key among the sequence's own rows, positions 0..T-1)
// on tensor cores, scores never leaving registers: a block takes 64 queries of one head and walks
// the visible 64-key tiles of its kv head through shared memory, keeping an online softmax in fp32
// (FlashAttention-2's order; P is rounded to bf16 for the second product, as transformers' bf16
// path rounds its probabilities). Gemma 2's scale, softcap and sliding window; GQA. Twin of
// CpuBackend::Attention for sequences that start at position 0.
#pragma once

#include "kernels/prefill_attention.h"

namespace gemma2::kernels {

// head_dim 128 (27B); PrefillAttention serves the others.
bool FlashPrefillSupports(const PrefillAttentionShape& s);

// qkv: the sequence's rows [q | k | v] (RoPE applied), row_stride apart; out: [T, q_heads * 128].
cudaError_t FlashPrefillAttention(const bf16* qkv, const PrefillAttentionShape& s, bf16* out,
                                  cudaStream_t stream);

}  // namespace gemma2::kernels
