// Device-only helpers for the kernels' .cu files: bf16 conversions, reductions, cache addressing.
#pragma once

#include "kernels/paged_kv.h"
#include "kernels/types.h"

namespace gemma2::kernels {

__device__ __forceinline__ float ToF(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ bf16 ToB(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
__device__ __forceinline__ float BlockSum(float v) {
  __shared__ float partial[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = WarpSum(v);
  __syncthreads();  // partial[] may still be read by a previous call
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  const int warps = (blockDim.x + 31) >> 5;
  const float total = lane < warps ? partial[lane] : 0.0f;
  return WarpSum(total);
}

__device__ __forceinline__ int64_t KvOffset(const PagedKv& kv, int32_t seq, int32_t pos,
                                            int32_t kv_head, int32_t head_dim) {
  const int32_t block = kv.block_tables[static_cast<int64_t>(seq) * kv.table_stride + pos / kv.block_size];
  return ((static_cast<int64_t>(block) * kv.kv_heads + kv_head) * kv.block_size + pos % kv.block_size) *
         head_dim;
}

}  // namespace gemma2::kernels
