#include "kernels/embed.h"

#include "kernels/device.cuh"

namespace gemma2::kernels {
namespace {

__global__ void EmbedKernel(const int32_t* ids, const bf16* table, int64_t table_rows,
                            int64_t hidden, int64_t vocab_begin, float scale, bf16* out) {
  const int64_t t = blockIdx.x;
  const int64_t row = static_cast<int64_t>(ids[t]) - vocab_begin;
  bf16* dst = out + t * hidden;
  const bool mine = row >= 0 && row < table_rows;
  const bf16* src = table + (mine ? row : 0) * hidden;
  for (int64_t j = threadIdx.x; j < hidden; j += blockDim.x) {
    dst[j] = mine ? ToB(ToF(src[j]) * scale) : ToB(0.0f);
  }
}

}  // namespace

cudaError_t Embed(const int32_t* ids, int64_t tokens, const bf16* table, int64_t table_rows,
                  int64_t hidden, int64_t vocab_begin, float scale, bf16* out, cudaStream_t stream) {
  if (tokens == 0) return cudaSuccess;
  EmbedKernel<<<static_cast<unsigned>(tokens), 256, 0, stream>>>(ids, table, table_rows, hidden,
                                                                   vocab_begin, scale, out);
  return cudaGetLastError();
}

}  // namespace gemma2::kernels
