// The paged KV cache as kernels see it, and the per-token metadata of a step.
#pragma once

#include "kernels/types.h"

namespace gemma2::kernels {

// One layer of the cache. A block holds `block_size` consecutive positions of one sequence:
// k[block][kv_head][slot][head_dim] (v likewise). Sequence s's position p lives in block
// block_tables[s * table_stride + p / block_size], slot p % block_size.
struct PagedKv {
  bf16* k = nullptr;
  bf16* v = nullptr;
  // --kv-cache-dtype fp8 (k and v null then): E4M3 values in the same layout, and one fp32 scale
  // per (block, kv_head, slot), at a value's offset / head_dim (model/quantization.h).
  uint8_t* k8 = nullptr;
  uint8_t* v8 = nullptr;
  float* k_scale = nullptr;
  float* v_scale = nullptr;
  const int32_t* block_tables = nullptr;
  int32_t table_stride = 0;
  int32_t block_size = 16;
  int32_t kv_heads = 0;
};

// Token t of the step belongs to sequence token_seq[t] and sits at position token_pos[t].
struct StepTokens {
  const int32_t* token_seq = nullptr;
  const int32_t* token_pos = nullptr;
  int64_t count = 0;
};

}  // namespace gemma2::kernels
