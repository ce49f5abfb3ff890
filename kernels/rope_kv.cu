#include "kernels/rope_kv.h"

#include "kernels/device.cuh"

namespace gemma2::kernels {
namespace {

// Block (t, h) rotates head h of token t (q heads, then k heads; k heads also go to the cache);
// blocks of the last "head" index copy v into the cache.
__global__ void RopeKvKernel(bf16* qkv, int64_t row_stride, StepTokens tokens, int32_t q_heads,
                             int32_t kv_heads, int32_t head_dim, const float* inv_freq, PagedKv kv) {
  const int64_t t = blockIdx.x;
  const int32_t h = blockIdx.y;
  const int32_t seq = tokens.token_seq[t], pos = tokens.token_pos[t];
  bf16* row = qkv + t * row_stride;
  const int32_t half = head_dim / 2;
  if (h == q_heads + kv_heads) {  // v heads: copy only
    const bf16* v = row + (q_heads + kv_heads) * head_dim;
    for (int32_t idx = threadIdx.x; idx < kv_heads * head_dim; idx += blockDim.x) {
      const int32_t g = idx / head_dim, d = idx % head_dim;
      kv.v[KvOffset(kv, seq, pos, g, head_dim) + d] = v[idx];
    }
    return;
  }
  bf16* x = row + h * head_dim;
  bf16* dst = h >= q_heads ? kv.k + KvOffset(kv, seq, pos, h - q_heads, head_dim) : nullptr;
  for (int32_t i = threadIdx.x; i < half; i += blockDim.x) {
    const float angle = static_cast<float>(pos) * inv_freq[i];  // fp32 product, as the reference
    float s, c;
    sincosf(angle, &s, &c);  // full-precision (not the fast intrinsic)
    const float a = ToF(x[i]), b = ToF(x[i + half]);
    const bf16 ra = ToB(a * c - b * s), rb = ToB(b * c + a * s);
    x[i] = ra;
    x[i + half] = rb;
    if (dst) {
      dst[i] = ra;
      dst[i + half] = rb;
    }
  }
}

}  // namespace

cudaError_t RopeAndCacheWrite(bf16* qkv, int64_t row_stride, const StepTokens& tokens,
                              int32_t q_heads, int32_t kv_heads, int32_t head_dim,
                              const float* inv_freq, const PagedKv& kv, cudaStream_t stream) {
  if (tokens.count == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(tokens.count), static_cast<unsigned>(q_heads + kv_heads + 1));
  RopeKvKernel<<<grid, 128, 0, stream>>>(qkv, row_stride, tokens, q_heads, kv_heads, head_dim,
                                         inv_freq, kv);
  return cudaGetLastError();
}

}  // namespace gemma2::kernels
