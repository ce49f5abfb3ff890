#include "cuda/kv_pool.h"

#include <algorithm>
#include <vector>

#include "common/cuda_check.h"
#include "cuda/device_memory.h"
#include "kernels/kv_copy.h"

namespace gemma2 {

using kernels::bf16;

Result<std::unique_ptr<KvPool>> KvPool::Create(std::span<const KvGroup> layer_groups,
                                               const KvPoolShape& shape, int64_t blocks,
                                               int64_t budget_bytes) {
  if (shape.block_size <= 0) return InvalidArgument("KV block size must be positive");
  std::unique_ptr<KvPool> pool(new KvPool());
  pool->layers_ = KvLayerSlots(layer_groups);
  pool->shape_ = shape;
  pool->max_blocks_ = (shape.max_positions + shape.block_size - 1) / shape.block_size;
  const int64_t per_block = 2 * pool->layers_.slots * pool->block_elems() * 2;  // k+v, bf16
  if (blocks <= 0) {
    int64_t bytes = budget_bytes;
    if (bytes <= 0) {
      size_t free_b = 0, total = 0;
      RETURN_IF_CUDA_ERROR(cudaMemGetInfo(&free_b, &total));
      // 8192 tokens of 27B need about 3 GiB of activations.
      bytes =
          std::max(static_cast<int64_t>(static_cast<double>(free_b) * 0.95) - (int64_t{8} << 30),
                   static_cast<int64_t>(free_b / 4));
    }
    blocks = bytes / per_block;
  }
  if (blocks < 1) return Status(StatusCode::kUnavailable, "no device memory left for a KV cache");
  pool->num_blocks_ = blocks;
  const size_t half = static_cast<size_t>(blocks * per_block / 2);
  ASSIGN_OR_RETURN(pool->k_, DeviceAlloc(half));
  ASSIGN_OR_RETURN(pool->v_, DeviceAlloc(half));
  return pool;
}

kernels::PagedKv KvPool::Layer(int64_t layer, const int32_t* block_tables,
                               size_t tables_per_group) const {
  const auto l = static_cast<size_t>(layer);
  const int64_t slot_offset = layers_.slot[l] * slot_elems();
  kernels::PagedKv kv;
  kv.k = static_cast<bf16*>(k_.get()) + slot_offset;
  kv.v = static_cast<bf16*>(v_.get()) + slot_offset;
  kv.block_tables = block_tables + static_cast<size_t>(layers_.group[l]) * tables_per_group;
  kv.table_stride = static_cast<int32_t>(max_blocks_);
  kv.block_size = static_cast<int32_t>(shape_.block_size);
  kv.kv_heads = static_cast<int32_t>(shape_.kv_heads);
  return kv;
}

Status KvPool::CopyBlocks(std::span<const int32_t> from, std::span<const int32_t> to,
                          cudaStream_t stream) {
  if (from.size() != to.size()) return InvalidArgument("CopyKvBlocks: unpaired blocks");
  if (from.empty()) return OkStatus();
  std::vector<int32_t> pairs(2 * from.size());
  for (size_t i = 0; i < from.size(); ++i) {
    if (from[i] < 0 || from[i] >= num_blocks_ || to[i] < 0 || to[i] >= num_blocks_)
      return InvalidArgument("CopyKvBlocks: block out of range");
    pairs[2 * i] = from[i];
    pairs[2 * i + 1] = to[i];
  }
  const size_t bytes = pairs.size() * sizeof(int32_t);
  if (bytes > copy_pairs_bytes_) {
    RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(stream));  // the old list is no longer read
    copy_pairs_bytes_ = 0;
    ASSIGN_OR_RETURN(copy_pairs_, DeviceAlloc(bytes));
    copy_pairs_bytes_ = bytes;
  }
  // From pageable memory: returns once `pairs` is staged, ordered on the stream.
  RETURN_IF_CUDA_ERROR(
      cudaMemcpyAsync(copy_pairs_.get(), pairs.data(), bytes, cudaMemcpyHostToDevice, stream));
  RETURN_IF_CUDA_ERROR(kernels::CopyKvBlocks(
      static_cast<bf16*>(k_.get()), static_cast<bf16*>(v_.get()), layers_.slots, slot_elems(),
      block_elems(), static_cast<const int32_t*>(copy_pairs_.get()),
      static_cast<int64_t>(from.size()), stream));
  return OkStatus();
}

}  // namespace gemma2
