#include "kernels/rope_kv.h"

#include "kernels/device.cuh"

namespace gemma2::kernels {
namespace {

__global__ void RopeKvKernel(bf16* qkv, int64_t row_stride, StepTokens tokens, int32_t q_heads,
                             int32_t kv_heads, int32_t head_dim, const float* inv_freq, PagedKv kv) {
  const int64_t t = blockIdx.x;
  const int32_t seq = tokens.token_seq[t], pos = tokens.token_pos[t];
  bf16* row = qkv + t * row_stride;
  const int32_t half = head_dim / 2;
  // Rotate every q and k head: one (head, i) pair per thread iteration.
  for (int32_t idx = threadIdx.x; idx < (q_heads + kv_heads) * half; idx += blockDim.x) {
    const int32_t h = idx / half, i = idx % half;
    const float angle = static_cast<float>(pos) * inv_freq[i];
    const float c = static_cast<float>(cos(static_cast<double>(angle)));
    const float s = static_cast<float>(sin(static_cast<double>(angle)));
    bf16* x = row + h * head_dim;
    const float a = ToF(x[i]), b = ToF(x[i + half]);
    const bf16 ra = ToB(a * c - b * s), rb = ToB(b * c + a * s);
    x[i] = ra;
    x[i + half] = rb;
    if (h >= q_heads) {  // a k head: also into the cache
      const int32_t g = h - q_heads;
      bf16* dst = kv.k + KvOffset(kv, seq, pos, g, head_dim);
      dst[i] = ra;
      dst[i + half] = rb;
    }
  }
  const bf16* v = row + (q_heads + kv_heads) * head_dim;
  for (int32_t idx = threadIdx.x; idx < kv_heads * head_dim; idx += blockDim.x) {
    const int32_t g = idx / head_dim, d = idx % head_dim;
    kv.v[KvOffset(kv, seq, pos, g, head_dim) + d] = v[idx];
  }
}

}  // namespace

cudaError_t RopeAndCacheWrite(bf16* qkv, int64_t row_stride, const StepTokens& tokens,
                              int32_t q_heads, int32_t kv_heads, int32_t head_dim,
                              const float* inv_freq, const PagedKv& kv, cudaStream_t stream) {
  if (tokens.count == 0) return cudaSuccess;
  RopeKvKernel<<<static_cast<unsigned>(tokens.count), 256, 0, stream>>>(
      qkv, row_stride, tokens, q_heads, kv_heads, head_dim, inv_freq, kv);
  return cudaGetLastError();
}

}  // namespace gemma2::kernels
