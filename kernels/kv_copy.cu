#include "kernels/kv_copy.h"

namespace gemma2::kernels {
namespace {

// Block (pair, slot, a or b) copies one KV block in words of W (uint4 or uint32_t).
template <typename W>
__global__ void CopyKvBlocksKernel(char* a, char* b, int64_t slot_bytes, int64_t block_bytes,
                                   const int32_t* __restrict__ pairs) {
  const int64_t i = blockIdx.x, slot = blockIdx.y;
  char* base = (blockIdx.z == 0 ? a : b) + slot * slot_bytes;
  const W* src = reinterpret_cast<const W*>(base + pairs[2 * i] * block_bytes);
  W* dst = reinterpret_cast<W*>(base + pairs[2 * i + 1] * block_bytes);
  for (int64_t j = threadIdx.x; j < block_bytes / static_cast<int64_t>(sizeof(W)); j += blockDim.x)
    dst[j] = src[j];
}

}  // namespace

cudaError_t CopyKvBlocks(void* a, void* b, int64_t slots, int64_t slot_bytes, int64_t block_bytes,
                         const int32_t* pairs, int64_t count, cudaStream_t stream) {
  if (count == 0 || slots == 0) return cudaSuccess;
  if (block_bytes % 4 != 0 || count > 0x7fffffff || slots > 65535) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(count), static_cast<unsigned>(slots), 2);
  char* pa = static_cast<char*>(a);
  char* pb = static_cast<char*>(b);
  if (block_bytes % 16 == 0 && slot_bytes % 16 == 0) {
    CopyKvBlocksKernel<uint4><<<grid, 256, 0, stream>>>(pa, pb, slot_bytes, block_bytes, pairs);
  } else {
    CopyKvBlocksKernel<uint32_t><<<grid, 256, 0, stream>>>(pa, pb, slot_bytes, block_bytes, pairs);
  }
  return cudaGetLastError();
}

}  // namespace gemma2::kernels
