#include "kernels/fp8.h"

#include <cuda_fp8.h>

#include "kernels/device.cuh"

namespace gemma2::kernels {
namespace {

constexpr int kQuantThreads = 256;

// One block per row.
__global__ void __launch_bounds__(kQuantThreads)
    QuantizeRowsKernel(const bf16* x, int64_t cols, fp8* q, float* scale) {
  const int64_t row = blockIdx.x;
  const bf16* xr = x + row * cols;
  float amax = 0.0f;
  for (int64_t k = threadIdx.x; k < cols; k += kQuantThreads) amax = fmaxf(amax, fabsf(ToF(xr[k])));
  amax = BlockMax(amax);
  const float s = Fp8RowScale(amax);
  if (threadIdx.x == 0) scale[row] = s;
  fp8* qr = q + row * cols;
  for (int64_t k = threadIdx.x; k < cols; k += kQuantThreads) {
    qr[k] = __nv_cvt_float_to_fp8(__fdiv_rn(ToF(xr[k]), s), __NV_SATFINITE, __NV_E4M3);
  }
}

__global__ void ScaleRowsAndColumnsKernel(const float* in, const float* row_scale,
                                          const float* col_scale, void* out, bool out_f32,
                                          int64_t rows, int64_t cols) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * cols) return;
  const float v = in[i] * row_scale[i / cols] * col_scale[i % cols];
  if (out_f32) {
    static_cast<float*>(out)[i] = v;
  } else {
    static_cast<bf16*>(out)[i] = ToB(v);
  }
}

constexpr int kWarps = 8;

// 16 E4M3 weights (one 16-byte load) times 16 bf16 activations (two), into acc.
__device__ __forceinline__ void Fma16(const uint4& w, const uint4& x0, const uint4& x1,
                                      float& acc) {
  const auto* wp = reinterpret_cast<const __nv_fp8x2_storage_t*>(&w);
  const auto* xa = reinterpret_cast<const __nv_bfloat162*>(&x0);
  const auto* xb = reinterpret_cast<const __nv_bfloat162*>(&x1);
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const __half2 h = __half2(__nv_cvt_fp8x2_to_halfraw2(wp[i], __NV_E4M3));
    const float2 a = __half22float2(h);
    const float2 b = __bfloat1622float2(i < 4 ? xa[i] : xb[i - 4]);
    acc = fmaf(a.x, b.x, acc);
    acc = fmaf(a.y, b.y, acc);
  }
}

template <int T>
__global__ void __launch_bounds__(32 * kWarps)
    GemvFp8Kernel(const bf16* x, const fp8* w, const float* scale, void* out, bool out_f32,
                  int64_t n, int64_t k) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= n) return;
  const int64_t chunks = k / 16;  // 16 weights per chunk
  const uint4* wr = reinterpret_cast<const uint4*>(w + row * k);
  const uint4* xr = reinterpret_cast<const uint4*>(x);  // 8 bf16 per uint4: 2 per chunk
  float acc[T];
#pragma unroll
  for (int t = 0; t < T; ++t) acc[t] = 0.0f;
#pragma unroll 4
  for (int64_t i = lane; i < chunks; i += 32) {
    const uint4 wv = __ldcs(wr + i);  // streamed once: do not keep in cache
#pragma unroll
    for (int t = 0; t < T; ++t) {
      const uint4* xt = xr + t * (k / 8) + 2 * i;
      Fma16(wv, __ldg(xt), __ldg(xt + 1), acc[t]);
    }
  }
  const float s = scale[row];
#pragma unroll
  for (int t = 0; t < T; ++t) {
    const float v = WarpSum(acc[t]) * s;
    if (lane == 0) {
      if (out_f32) {
        static_cast<float*>(out)[t * n + row] = v;
      } else {
        static_cast<bf16*>(out)[t * n + row] = ToB(v);
      }
    }
  }
}

template <int T>
void LaunchGemvFp8(const bf16* x, const fp8* w, const float* scale, void* out, bool out_f32,
                   int64_t n, int64_t k, cudaStream_t stream) {
  GemvFp8Kernel<T><<<CeilDiv(n, kWarps), 32 * kWarps, 0, stream>>>(x, w, scale, out, out_f32, n, k);
}

}  // namespace

cudaError_t QuantizeRowsFp8(const bf16* x, int64_t rows, int64_t cols, fp8* q, float* scale,
                            cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  QuantizeRowsKernel<<<static_cast<unsigned>(rows), kQuantThreads, 0, stream>>>(x, cols, q, scale);
  return cudaGetLastError();
}

cudaError_t ScaleRowsAndColumns(const float* in, const float* row_scale, const float* col_scale,
                                void* out, bool out_f32, int64_t rows, int64_t cols,
                                cudaStream_t stream) {
  if (rows * cols == 0) return cudaSuccess;
  ScaleRowsAndColumnsKernel<<<CeilDiv(rows * cols, 256), 256, 0, stream>>>(
      in, row_scale, col_scale, out, out_f32, rows, cols);
  return cudaGetLastError();
}

bool GemvFp8Supports(const void* x, const void* w, int64_t tokens, int64_t k) {
  return tokens >= 1 && tokens <= kGemvFp8MaxTokens && k % 16 == 0 &&
         reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(w) % 16 == 0;
}

cudaError_t GemvFp8(const bf16* x, const fp8* w, const float* scale, void* out, bool out_f32,
                    int64_t tokens, int64_t n, int64_t k, cudaStream_t stream) {
  if (!GemvFp8Supports(x, w, tokens, k)) return cudaErrorInvalidValue;
  switch (tokens) {
    case 1: LaunchGemvFp8<1>(x, w, scale, out, out_f32, n, k, stream); break;
    case 2: LaunchGemvFp8<2>(x, w, scale, out, out_f32, n, k, stream); break;
    case 3: LaunchGemvFp8<3>(x, w, scale, out, out_f32, n, k, stream); break;
    case 4: LaunchGemvFp8<4>(x, w, scale, out, out_f32, n, k, stream); break;
    case 5: LaunchGemvFp8<5>(x, w, scale, out, out_f32, n, k, stream); break;
    case 6: LaunchGemvFp8<6>(x, w, scale, out, out_f32, n, k, stream); break;
    case 7: LaunchGemvFp8<7>(x, w, scale, out, out_f32, n, k, stream); break;
    default: LaunchGemvFp8<8>(x, w, scale, out, out_f32, n, k, stream); break;
  }
  return cudaGetLastError();
}

}  // namespace gemma2::kernels
