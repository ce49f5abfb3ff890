#include "kernels/gemv.h"

#include "kernels/device.cuh"

namespace gemma2::kernels {
namespace {

constexpr int kWarps = 8;

__device__ __forceinline__ void Fma8(const uint4& w, const uint4& x, float& acc) {
  const auto* wp = reinterpret_cast<const __nv_bfloat162*>(&w);
  const auto* xp = reinterpret_cast<const __nv_bfloat162*>(&x);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 a = __bfloat1622float2(wp[i]), b = __bfloat1622float2(xp[i]);
    acc = fmaf(a.x, b.x, acc);
    acc = fmaf(a.y, b.y, acc);
  }
}

template <int T>
__global__ void __launch_bounds__(32 * kWarps) GemvKernel(const bf16* x, const bf16* w, void* out,
                                                          bool out_f32, int64_t n, int64_t k) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= n) return;
  const int64_t chunks = k / 8;
  const uint4* wr = reinterpret_cast<const uint4*>(w + row * k);
  const uint4* xr = reinterpret_cast<const uint4*>(x);
  float acc[T];
#pragma unroll
  for (int t = 0; t < T; ++t) acc[t] = 0.0f;
#pragma unroll 4
  for (int64_t i = lane; i < chunks; i += 32) {
    const uint4 wv = __ldcs(wr + i);  // streamed once: do not keep in cache
#pragma unroll
    for (int t = 0; t < T; ++t) Fma8(wv, __ldg(xr + t * chunks + i), acc[t]);
  }
#pragma unroll
  for (int t = 0; t < T; ++t) {
    const float v = WarpSum(acc[t]);
    if (lane == 0) {
      if (out_f32) {
        static_cast<float*>(out)[t * n + row] = v;
      } else {
        static_cast<bf16*>(out)[t * n + row] = ToB(v);
      }
    }
  }
}

}  // namespace

bool GemvSupports(const void* x, const void* w, int64_t tokens, int64_t k) {
  return tokens >= 1 && tokens <= kGemvMaxTokens && k % 8 == 0 &&
         reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(w) % 16 == 0;
}

cudaError_t Gemv(const bf16* x, const bf16* w, void* out, bool out_f32, int64_t tokens, int64_t n,
                 int64_t k, cudaStream_t stream) {
  if (!GemvSupports(x, w, tokens, k)) return cudaErrorInvalidValue;
  const unsigned blocks = CeilDiv(n, kWarps);
  switch (tokens) {
    case 1: GemvKernel<1><<<blocks, 32 * kWarps, 0, stream>>>(x, w, out, out_f32, n, k); break;
    case 2: GemvKernel<2><<<blocks, 32 * kWarps, 0, stream>>>(x, w, out, out_f32, n, k); break;
    case 3: GemvKernel<3><<<blocks, 32 * kWarps, 0, stream>>>(x, w, out, out_f32, n, k); break;
    default: GemvKernel<4><<<blocks, 32 * kWarps, 0, stream>>>(x, w, out, out_f32, n, k); break;
  }
  return cudaGetLastError();
}

}  // namespace gemma2::kernels
