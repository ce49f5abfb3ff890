#include "kernels/device.cuh"
#include "kernels/rms_norm.h"

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

// Values a thread owns stay in registers between the passes (hidden <= kThreads * kPer). kPer is
// the smallest instance that holds the row, so the registers (four arrays of kPer) stay few
// enough for two blocks per SM when a prefill's thousands of rows need the occupancy.
constexpr int kMaxPer = 16;

template <int kPer>
__global__ void __launch_bounds__(kThreads)
    AddRmsNormKernel(bf16* residual, const bf16* delta, const bf16* post_w, const bf16* next_w,
                     int64_t hidden, float eps, bf16* normed) {
  const bf16* d = delta + blockIdx.x * hidden;
  bf16* res = residual + blockIdx.x * hidden;
  float dv[kPer], rv[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int64_t j = threadIdx.x + static_cast<int64_t>(i) * kThreads;
    dv[i] = j < hidden ? ToF(d[j]) : 0.0f;
    rv[i] = j < hidden ? ToF(res[j]) : 0.0f;
  }
  AddRmsNormRow<kThreads, kPer>(dv, rv, hidden, eps, post_w, next_w, res,
                                next_w ? normed + blockIdx.x * hidden : nullptr);
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
  const int64_t per = (hidden + kThreads - 1) / kThreads;
  const auto launch = [&](auto kernel) {
    kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(residual, delta, post_w, next_w,
                                                                 hidden, eps, normed);
    return cudaGetLastError();
  };
  if (per <= 5) return launch(AddRmsNormKernel<5>);  // 2B: 2304
  if (per <= 7) return launch(AddRmsNormKernel<7>);  // 9B: 3584
  if (per <= 9) return launch(AddRmsNormKernel<9>);  // 27B: 4608
  if (per <= kMaxPer) return launch(AddRmsNormKernel<kMaxPer>);
  return cudaErrorInvalidValue;
}

}  // namespace gemma2::kernels
