// The cuda backend's paged KV cache: for each layer slot of a group (a layer's index among its
// group's layers on this rank), `num_blocks` blocks of [kv_head][slot][head_dim] bf16, k and v
// apart; with an FP8 cache, E4M3 values in that layout and an fp32 scale per [kv_head][slot]. Block
// tables come per step (the backend stages them); the pool owns the memory and the block-to-block
// copies of prefix sharing.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <span>

#include "common/status.h"
#include "kernels/paged_kv.h"
#include "model/kv_blocks.h"

namespace gemma2 {

struct KvPoolShape {
  int64_t kv_heads = 0, head_dim = 0, block_size = 0;
  int64_t max_positions = 0;  // a sequence's most positions: fixes the block-table stride
  bool fp8 = false;           // --kv-cache-dtype fp8 (model/quantization.h)
};

class KvPool {
 public:
  // `blocks` > 0: that many; else as many as `budget_bytes` hold, or when that is 0 too, 95% of
  // the device memory free now less 8 GiB (a long prefill's activations), or a quarter of what
  // is free on a GPU that another process already fills.
  static Result<std::unique_ptr<KvPool>> Create(std::span<const KvGroup> layer_groups,
                                                const KvPoolShape& shape, int64_t blocks,
                                                int64_t budget_bytes);

  int64_t num_blocks() const { return num_blocks_; }
  int64_t block_size() const { return shape_.block_size; }
  // Entries of one sequence's block table (the stride of staged tables).
  int64_t max_blocks() const { return max_blocks_; }
  KvGroup group(int64_t layer) const { return layers_.group[static_cast<size_t>(layer)]; }
  const std::vector<KvGroup>& groups() const { return layers_.group; }

  // Local layer `layer` as the kernels see it, over tables staged as [group][sequence][block]
  // with `tables_per_group` entries per group.
  kernels::PagedKv Layer(int64_t layer, const int32_t* block_tables,
                         size_t tables_per_group) const;

  // Block to[i] receives block from[i] (every layer slot), in `stream` order. Between steps only.
  Status CopyBlocks(std::span<const int32_t> from, std::span<const int32_t> to,
                    cudaStream_t stream);

 private:
  KvPool() = default;
  int64_t block_elems() const { return shape_.kv_heads * shape_.block_size * shape_.head_dim; }
  int64_t slot_elems() const { return num_blocks_ * block_elems(); }
  int64_t elem_bytes() const { return shape_.fp8 ? 1 : 2; }
  // FP8: the scales of a block (one per kv head and slot), and of a layer slot.
  int64_t block_scales() const { return shape_.kv_heads * shape_.block_size; }
  int64_t slot_scales() const { return num_blocks_ * block_scales(); }

  KvLayerSlots layers_;
  KvPoolShape shape_;
  int64_t num_blocks_ = 0, max_blocks_ = 0;
  std::shared_ptr<void> k_, v_;
  std::shared_ptr<void> k_scale_, v_scale_;  // FP8 only
  std::shared_ptr<void> copy_pairs_;  // CopyBlocks' (from, to) list on the device
  size_t copy_pairs_bytes_ = 0;
};

}  // namespace gemma2
