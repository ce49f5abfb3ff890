#include "kernels/sample.h"

#include "common/sampling_noise.h"
#include "kernels/device.cuh"

namespace gemma2::kernels {
namespace {

constexpr int kThreads = 1024;

template <typename T, typename Op>
__device__ T BlockReduce(T v, Op op) {
  __shared__ T buf[kThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  __syncthreads();
  if (lane == 0) buf[warp] = v;
  __syncthreads();
  v = buf[0];
  for (int w = 1; w < kThreads / 32; ++w) v = op(v, buf[w]);
  return v;
}

// The kept token with the largest score (ties: the lowest index), over (score, index) pairs.
__device__ int64_t BlockArgmax(float score, int64_t index) {
  __shared__ float best_s[kThreads];
  __shared__ int64_t best_i[kThreads];
  best_s[threadIdx.x] = score;
  best_i[threadIdx.x] = index;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      const float os = best_s[threadIdx.x + s];
      const int64_t oi = best_i[threadIdx.x + s];
      if (oi >= 0 && (best_i[threadIdx.x] < 0 || os > best_s[threadIdx.x] ||
                      (os == best_s[threadIdx.x] && oi < best_i[threadIdx.x]))) {
        best_s[threadIdx.x] = os;
        best_i[threadIdx.x] = oi;
      }
    }
    __syncthreads();
  }
  return best_i[0];
}

__global__ void __launch_bounds__(kThreads)
    SampleKernel(const float* __restrict__ logits, int64_t cols, const DeviceSampling* params,
                 double* __restrict__ scratch, int32_t* ids) {
  const int64_t row = blockIdx.x;
  const DeviceSampling p = params[row];
  const float* x = logits + row * cols;
  if (p.greedy) {
    float best = -INFINITY;
    int64_t best_i = -1;
    for (int64_t j = threadIdx.x; j < cols; j += kThreads) {
      if (best_i < 0 || x[j] > best) {
        best = x[j];
        best_i = j;
      }
    }
    const int64_t r = BlockArgmax(best, best_i);
    if (threadIdx.x == 0) ids[row] = static_cast<int32_t>(r < 0 ? 0 : r);
    return;
  }
  // v = x / T; w = exp(v - max v) in fp64, kept in scratch for the mass searches.
  float vmax = -INFINITY;
  for (int64_t j = threadIdx.x; j < cols; j += kThreads) vmax = fmaxf(vmax, x[j] / p.temperature);
  vmax = BlockReduce(vmax, [](float a, float b) { return fmaxf(a, b); });
  double* w = scratch + row * cols;
  double z = 0;
  for (int64_t j = threadIdx.x; j < cols; j += kThreads) {
    w[j] = exp(static_cast<double>(x[j] / p.temperature) - vmax);
    z += w[j];
  }
  z = BlockReduce(z, [](double a, double b) { return a + b; });
  // tau: the largest key whose "values >= key" keep at least top_k tokens and top_p of the mass.
  // Every thread runs the same probes (the reductions hand all threads the same answer).
  uint32_t lo = 0;
  if (p.top_k > 0 && p.top_k < cols) {
    lo = max(lo, LargestKey([&](uint32_t k) {
      int64_t n = 0;
      for (int64_t j = threadIdx.x; j < cols; j += kThreads) n += FloatKey(x[j] / p.temperature) >= k;
      return BlockReduce(n, [](int64_t a, int64_t b) { return a + b; }) >= p.top_k;
    }));
  }
  if (p.top_p < 1.0f) {
    const double target = static_cast<double>(p.top_p) * z;
    lo = max(lo, LargestKey([&](uint32_t k) {
      double m = 0;
      for (int64_t j = threadIdx.x; j < cols; j += kThreads) {
        if (FloatKey(x[j] / p.temperature) >= k) m += w[j];
      }
      return BlockReduce(m, [](double a, double b) { return a + b; }) >= target;
    }));
  }
  const float tau = lo == 0 ? -INFINITY : KeyFloat(lo);
  float best = -INFINITY;
  int64_t best_i = -1;
  for (int64_t j = threadIdx.x; j < cols; j += kThreads) {
    const float v = x[j] / p.temperature;
    if (v < tau) continue;
    const float s = v + GumbelNoise(p.seed, p.counter, static_cast<uint64_t>(j));
    if (best_i < 0 || s > best) {
      best = s;
      best_i = j;
    }
  }
  const int64_t r = BlockArgmax(best, best_i);
  if (threadIdx.x == 0) ids[row] = static_cast<int32_t>(r < 0 ? 0 : r);
}

}  // namespace

size_t SampleScratchBytes(int64_t rows, int64_t cols) {
  return static_cast<size_t>(rows * cols) * sizeof(double);
}

cudaError_t SampleRows(const float* logits, int64_t rows, int64_t cols, const DeviceSampling* params,
                       void* scratch, int32_t* ids, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  SampleKernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
      logits, cols, params, static_cast<double*>(scratch), ids);
  return cudaGetLastError();
}

}  // namespace gemma2::kernels
