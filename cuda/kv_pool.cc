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
  // k and v: bf16, or E4M3 and an fp32 scale per kv head and slot.
  const int64_t per_block =
      2 * pool->layers_.slots *
      (pool->block_elems() * pool->elem_bytes() + (shape.fp8 ? pool->block_scales() * 4 : 0));
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
  const auto values =
      static_cast<size_t>(pool->slot_elems() * pool->layers_.slots * pool->elem_bytes());
  ASSIGN_OR_RETURN(pool->k_, DeviceAlloc(values));
  ASSIGN_OR_RETURN(pool->v_, DeviceAlloc(values));
  if (shape.fp8) {
    const auto scales =
        static_cast<size_t>(pool->slot_scales() * pool->layers_.slots) * sizeof(float);
    ASSIGN_OR_RETURN(pool->k_scale_, DeviceAlloc(scales));
    ASSIGN_OR_RETURN(pool->v_scale_, DeviceAlloc(scales));
  }
  return pool;
}

kernels::PagedKv KvPool::Layer(int64_t layer, const int32_t* block_tables,
                               size_t tables_per_group) const {
  const auto l = static_cast<size_t>(layer);
  const int64_t slot_offset = layers_.slot[l] * slot_elems();
  kernels::PagedKv kv;
  if (shape_.fp8) {
    const int64_t scale_offset = layers_.slot[l] * slot_scales();
    kv.k8 = static_cast<uint8_t*>(k_.get()) + slot_offset;
    kv.v8 = static_cast<uint8_t*>(v_.get()) + slot_offset;
    kv.k_scale = static_cast<float*>(k_scale_.get()) + scale_offset;
    kv.v_scale = static_cast<float*>(v_scale_.get()) + scale_offset;
  } else {
    kv.k = static_cast<bf16*>(k_.get()) + slot_offset;
    kv.v = static_cast<bf16*>(v_.get()) + slot_offset;
  }
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
  const auto* list = static_cast<const int32_t*>(copy_pairs_.get());
  const auto count = static_cast<int64_t>(from.size());
  RETURN_IF_CUDA_ERROR(kernels::CopyKvBlocks(k_.get(), v_.get(), layers_.slots,
                                             slot_elems() * elem_bytes(),
                                             block_elems() * elem_bytes(), list, count, stream));
  if (shape_.fp8) {
    RETURN_IF_CUDA_ERROR(kernels::CopyKvBlocks(k_scale_.get(), v_scale_.get(), layers_.slots,
                                               slot_scales() * 4, block_scales() * 4, list, count,
                                               stream));
  }
  return OkStatus();
}

}  // namespace gemma2
