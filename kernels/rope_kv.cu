#include <cuda_fp8.h>

#include "kernels/device.cuh"
#include "kernels/rope_kv.h"

namespace gemma2::kernels {
namespace {

// Gemma 2's head_dims are 128 and 256 (cuda_backend refuses others before any kernel runs).
constexpr int32_t kMaxHeadDim = 256;

// An FP8 cache's write of one head (the whole block takes part): the head's fp32 values `h`
// (shared; a k head as rotated, before any bf16 rounding) through E4M3 with the head's own scale
// (max |h| / 448, 1 for a zero head), the bytes and the scale into the cache, and x (the head in
// qkv) left as the cache gives it back: the cpu's RoundRowsThroughFp8 on the same fp32 values.
// The caller's writes to h come before (synced here).
__device__ void RoundHeadIntoCache(const float* h, bf16* x, int32_t head_dim, uint8_t* dst,
                                   float* scale) {
  __syncthreads();
  float amax = 0.0f;
  for (int32_t d = threadIdx.x; d < head_dim; d += blockDim.x) amax = fmaxf(amax, fabsf(h[d]));
  amax = BlockMax(amax);
  const float s = Fp8RowScale(amax);
  for (int32_t d = threadIdx.x; d < head_dim; d += blockDim.x) {
    const __nv_fp8_storage_t q =
        __nv_cvt_float_to_fp8(__fdiv_rn(h[d], s), __NV_SATFINITE, __NV_E4M3);
    dst[d] = q;
    x[d] = ToB(__half2float(__half(__nv_cvt_fp8_to_halfraw(q, __NV_E4M3))) * s);
  }
  if (threadIdx.x == 0) *scale = s;
}

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
    bf16* v = row + (q_heads + kv_heads + g) * head_dim;
    const int64_t at = KvOffset(kv, seq, pos, g, head_dim);
    if (kv.v8) {
      __shared__ float h32[kMaxHeadDim];
      for (int32_t d = threadIdx.x; d < head_dim; d += blockDim.x) h32[d] = ToF(v[d]);
      RoundHeadIntoCache(h32, v, head_dim, kv.v8 + at, kv.v_scale + at / head_dim);
      return;
    }
    bf16* dst = kv.v + at;
    for (int32_t d = threadIdx.x; d < head_dim; d += blockDim.x) dst[d] = v[d];
    return;
  }
  bf16* x = row + h * head_dim;
  const bool is_k = h >= q_heads;
  const int64_t at = is_k ? KvOffset(kv, seq, pos, h - q_heads, head_dim) : 0;
  bf16* dst = is_k && !kv.k8 ? kv.k + at : nullptr;
  __shared__ float k32[kMaxHeadDim];  // an FP8 cache's k head, rotated in fp32
  const bool k8 = is_k && kv.k8;
  for (int32_t i = threadIdx.x; i < half; i += blockDim.x) {
    const float angle = static_cast<float>(pos) * inv_freq[i];  // fp32 product, as the reference
    float s, c;
    sincosf(angle, &s, &c);  // full-precision (not the fast intrinsic)
    const float a = ToF(x[i]), b = ToF(x[i + half]);
    const float fa = a * c - b * s, fb = b * c + a * s;
    const bf16 ra = ToB(fa), rb = ToB(fb);
    x[i] = ra;
    x[i + half] = rb;
    if (k8) {
      k32[i] = fa;
      k32[i + half] = fb;
    }
    if (dst) {
      dst[i] = ra;
      dst[i + half] = rb;
    }
  }
  if (k8) RoundHeadIntoCache(k32, x, head_dim, kv.k8 + at, kv.k_scale + at / head_dim);
}

}  // namespace

cudaError_t RopeAndCacheWrite(bf16* qkv, int64_t row_stride, const StepTokens& tokens,
                              int32_t q_heads, int32_t kv_heads, int32_t head_dim,
                              const float* inv_freq, const PagedKv& kv, cudaStream_t stream) {
  if (tokens.count == 0) return cudaSuccess;
  if (head_dim > kMaxHeadDim || head_dim % 2 != 0) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(tokens.count),
                  static_cast<unsigned>(q_heads + 2 * kv_heads));
  RopeKvKernel<<<grid, 128, 0, stream>>>(qkv, row_stride, tokens, q_heads, kv_heads, head_dim,
                                         inv_freq, kv);
  return cudaGetLastError();
}

}  // namespace gemma2::kernels
