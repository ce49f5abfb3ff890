#include "kernels/kv_copy.h"

namespace gemma2::kernels {
namespace {

// Block (pair, slot, k or v) copies one KV block with 16-byte loads.
__global__ void CopyKvBlocksKernel(bf16* k, bf16* v, int64_t slot_elems, int64_t block_elems,
                                   const int32_t* __restrict__ pairs) {
  const int64_t i = blockIdx.x, slot = blockIdx.y;
  bf16* base = (blockIdx.z == 0 ? k : v) + slot * slot_elems;
  const uint4* src = reinterpret_cast<const uint4*>(base + pairs[2 * i] * block_elems);
  uint4* dst = reinterpret_cast<uint4*>(base + pairs[2 * i + 1] * block_elems);
  for (int64_t j = threadIdx.x; j < block_elems / 8; j += blockDim.x) dst[j] = src[j];
}

}  // namespace

cudaError_t CopyKvBlocks(bf16* k, bf16* v, int64_t slots, int64_t slot_elems, int64_t block_elems,
                         const int32_t* pairs, int64_t count, cudaStream_t stream) {
  if (count == 0 || slots == 0) return cudaSuccess;
  if (block_elems % 8 != 0 || count > 0x7fffffff || slots > 65535) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(count), static_cast<unsigned>(slots), 2);
  CopyKvBlocksKernel<<<grid, 256, 0, stream>>>(k, v, slot_elems, block_elems, pairs);
  return cudaGetLastError();
}

}  // namespace gemma2::kernels
