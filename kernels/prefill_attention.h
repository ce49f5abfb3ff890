// Attention of a fresh prefill (every key is among the step's own tokens) through tensor cores:
// S = K·Qᵀ per head (cuBLASLt, fp32), a masked softmax that writes P in bf16 (as transformers'
// eager bf16 path does), then O = V·P. Gemma 2's features (scale, softcap, sliding window, GQA)
// live in the softmax. Twin of CpuBackend::Attention for sequences that start at position 0.
#pragma once

#include "kernels/gemm.h"
#include "kernels/types.h"

namespace gemma2::kernels {

struct PrefillAttentionShape {
  int64_t tokens = 0;       // T: the sequence's tokens, positions 0 .. T-1
  int64_t q_heads = 0, kv_heads = 0, head_dim = 0;
  int64_t row_stride = 0;   // elements between rows of qkv
  float scale = 0, softcap = 0;
  int64_t window = 0;
};

// Bytes of workspace one call needs when it processes `kv_chunk` kv heads at a time.
size_t PrefillAttentionWorkspace(const PrefillAttentionShape& s, int64_t kv_chunk);
// How many kv heads fit at once into `budget` bytes of workspace (at least 1).
int64_t PrefillAttentionKvChunk(const PrefillAttentionShape& s, size_t budget);

// qkv: the sequence's rows [q | k | v] (RoPE applied); out: [T, q_heads * head_dim].
Status PrefillAttention(Gemm& gemm, const bf16* qkv, const PrefillAttentionShape& s, void* workspace,
                        int64_t kv_chunk, bf16* out, cudaStream_t stream);

}  // namespace gemma2::kernels
