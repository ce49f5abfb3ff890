#include "kernels/device.cuh"
#include "kernels/rope_kv.h"

namespace gemma2::kernels {
namespace {

// Block (t, h) rotates head h of token t (q heads, then k heads; k heads also go to the cache);
// blocks past them copy one v head each into the cache (one head per block: a decode step's
// latency is its slowest block's chain of loads, so no block copies all of them).
__global__ void RopeKvKernel(bf16* qkv, int64_t row_stride, StepTokens tokens, int32_t q_heads,
                             int32_t kv_heads, int32_t head_dim, const float* inv_freq,
                             PagedKv kv) {
  const int64_t t = blockIdx.x;
  const int32_t h = blockIdx.y;
  const int32_t seq = tokens.token_seq[t], pos = tokens.token_pos[t];
  bf16* row = qkv + t * row_stride;
  const int32_t half = head_dim / 2;
  if (h >= q_heads + kv_heads) {  // v head g: copy only
    const int32_t g = h - q_heads - kv_heads;
    const bf16* v = row + (q_heads + kv_heads + g) * head_dim;
    bf16* dst = kv.v + KvOffset(kv, seq, pos, g, head_dim);
    for (int32_t d = threadIdx.x; d < head_dim; d += blockDim.x) dst[d] = v[d];
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
  const dim3 grid(static_cast<unsigned>(tokens.count),
                  static_cast<unsigned>(q_heads + 2 * kv_heads));
  RopeKvKernel<<<grid, 128, 0, stream>>>(qkv, row_stride, tokens, q_heads, kv_heads, head_dim,
                                         inv_freq, kv);
  return cudaGetLastError();
}

}  // namespace gemma2::kernels
