#include "kernels/rms_norm.h"

#include "kernels/device.cuh"

namespace gemma2::kernels {
namespace {

constexpr int kThreads = 512;

__global__ void RmsNormKernel(const bf16* x, const bf16* w, int64_t hidden, float eps, bf16* out) {
  const bf16* row = x + blockIdx.x * hidden;
  float ss = 0;
  for (int64_t j = threadIdx.x; j < hidden; j += blockDim.x) {
    const float v = ToF(row[j]);
    ss += v * v;
  }
  const float scale = rsqrtf(BlockSum(ss) / static_cast<float>(hidden) + eps);
  bf16* dst = out + blockIdx.x * hidden;
  for (int64_t j = threadIdx.x; j < hidden; j += blockDim.x) {
    dst[j] = ToB(ToF(row[j]) * scale * (1.0f + ToF(w[j])));
  }
}

// Values a thread owns stay in registers between the passes (hidden <= kThreads * kPer).
constexpr int kPer = 16;

__global__ void __launch_bounds__(kThreads)
    AddRmsNormKernel(bf16* residual, const bf16* delta, const bf16* post_w, const bf16* next_w,
                     int64_t hidden, float eps, bf16* normed) {
  const bf16* d = delta + blockIdx.x * hidden;
  bf16* res = residual + blockIdx.x * hidden;
  float dv[kPer], rv[kPer];
  float ss = 0;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int64_t j = threadIdx.x + static_cast<int64_t>(i) * kThreads;
    dv[i] = j < hidden ? ToF(d[j]) : 0.0f;
    rv[i] = j < hidden ? ToF(res[j]) : 0.0f;
    ss += dv[i] * dv[i];
  }
  const float scale = rsqrtf(BlockSum(ss) / static_cast<float>(hidden) + eps);
  float ss2 = 0;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int64_t j = threadIdx.x + static_cast<int64_t>(i) * kThreads;
    if (j >= hidden) continue;
    const float n = ToF(ToB(dv[i] * scale * (1.0f + ToF(post_w[j]))));
    const bf16 sum = ToB(rv[i] + n);
    res[j] = sum;
    rv[i] = ToF(sum);
    ss2 += rv[i] * rv[i];
  }
  if (next_w == nullptr) return;
  const float scale2 = rsqrtf(BlockSum(ss2) / static_cast<float>(hidden) + eps);
  bf16* out = normed + blockIdx.x * hidden;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int64_t j = threadIdx.x + static_cast<int64_t>(i) * kThreads;
    if (j < hidden) out[j] = ToB(rv[i] * scale2 * (1.0f + ToF(next_w[j])));
  }
}

}  // namespace

cudaError_t RmsNorm(const bf16* x, const bf16* w, int64_t rows, int64_t hidden, float eps,
                    bf16* out, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  RmsNormKernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(x, w, hidden, eps, out);
  return cudaGetLastError();
}

cudaError_t AddRmsNorm(bf16* residual, const bf16* delta, const bf16* post_w, const bf16* next_w,
                       int64_t rows, int64_t hidden, float eps, bf16* normed, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (hidden > int64_t{kThreads} * kPer) return cudaErrorInvalidValue;
  AddRmsNormKernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
      residual, delta, post_w, next_w, hidden, eps, normed);
  return cudaGetLastError();
}

}  // namespace gemma2::kernels
