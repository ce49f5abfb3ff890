#include "kernels/elementwise.h"

#include "kernels/device.cuh"

namespace gemma2::kernels {
namespace {

__global__ void GeluTanhMulKernel(const bf16* gate_up, int64_t rows, int64_t n, bf16* out) {
  const int64_t total = rows * n;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = idx / n, i = idx % n;
    const float x = ToF(gate_up[r * 2 * n + i]), u = ToF(gate_up[r * 2 * n + n + i]);
    const float gelu = 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
    out[idx] = ToB(gelu * u);
  }
}

__global__ void SoftcapKernel(float* x, int64_t n, float cap) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    x[i] = tanhf(x[i] / cap) * cap;
  }
}

__global__ void MaskTokensKernel(float* x, int64_t cols, const uint64_t* masks, int64_t words,
                                 const int32_t* row_slot, int64_t first_bit) {
  const int64_t r = blockIdx.y;
  if (row_slot[r] < 0) return;
  const uint64_t* m = masks + row_slot[r] * words;
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < cols;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = first_bit + j;
    if (!((m[b >> 6] >> (b & 63)) & 1)) x[r * cols + j] = -INFINITY;
  }
}

__global__ void GatherRowsKernel(const bf16* x, int64_t cols, const int64_t* rows, bf16* out) {
  const bf16* src = x + rows[blockIdx.x] * cols;
  bf16* dst = out + blockIdx.x * cols;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) dst[j] = src[j];
}

__global__ void ScatterColumnsKernel(const float* src, int64_t src_cols, int64_t offset, float* dst,
                                     int64_t dst_cols) {
  const int64_t r = blockIdx.y;
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < dst_cols;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t k = j - offset;
    dst[r * dst_cols + j] = (k >= 0 && k < src_cols) ? src[r * src_cols + k] : 0.0f;
  }
}

template <typename T>
__global__ void AddBiasKernel(T* out, const bf16* bias, int64_t cols) {
  T* row = out + blockIdx.x * cols;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    if constexpr (sizeof(T) == 4) {
      row[j] += ToF(bias[j]);
    } else {
      row[j] = ToB(ToF(row[j]) + ToF(bias[j]));
    }
  }
}

constexpr int kArgmaxChunks = 64;

// Stage 1: block (chunk, row) finds the first maximum of its slice of the row.
__global__ void ArgmaxPartialKernel(const float* x, int64_t cols, float* part_v, int64_t* part_i) {
  const int64_t r = blockIdx.y;
  const int64_t per = (cols + gridDim.x - 1) / gridDim.x;
  const int64_t lo = blockIdx.x * per, hi = min(cols, lo + per);
  const float* row = x + r * cols;
  float best = -INFINITY;
  int64_t best_i = cols;
  for (int64_t j = lo + threadIdx.x; j < hi; j += blockDim.x) {
    if (row[j] > best) {
      best = row[j];
      best_i = j;
    }
  }
  __shared__ float vals[256];
  __shared__ int64_t idxs[256];
  vals[threadIdx.x] = best;
  idxs[threadIdx.x] = best_i;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      const float ov = vals[threadIdx.x + s];
      const int64_t oi = idxs[threadIdx.x + s];
      if (ov > vals[threadIdx.x] || (ov == vals[threadIdx.x] && oi < idxs[threadIdx.x])) {
        vals[threadIdx.x] = ov;
        idxs[threadIdx.x] = oi;
      }
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    part_v[r * gridDim.x + blockIdx.x] = vals[0];
    part_i[r * gridDim.x + blockIdx.x] = idxs[0];
  }
}

// Stage 2: one thread per row takes the first maximum over the chunks, in column order.
__global__ void ArgmaxFinalKernel(const float* part_v, const int64_t* part_i, int64_t rows,
                                  int64_t cols, int32_t* ids) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r >= rows) return;
  float best = -INFINITY;
  int64_t best_i = cols;
  for (int c = 0; c < kArgmaxChunks; ++c) {
    const float v = part_v[r * kArgmaxChunks + c];
    const int64_t i = part_i[r * kArgmaxChunks + c];
    if (v > best || (v == best && i < best_i)) {
      best = v;
      best_i = i;
    }
  }
  ids[r] = static_cast<int32_t>(best_i < cols ? best_i : 0);
}

unsigned Blocks(int64_t n) { return static_cast<unsigned>(std::min<int64_t>(4096, (n + 255) / 256)); }

}  // namespace

cudaError_t GeluTanhMul(const bf16* gate_up, int64_t rows, int64_t n, bf16* out, cudaStream_t stream) {
  if (rows * n == 0) return cudaSuccess;
  GeluTanhMulKernel<<<Blocks(rows * n), 256, 0, stream>>>(gate_up, rows, n, out);
  return cudaGetLastError();
}

cudaError_t Softcap(float* x, int64_t n, float cap, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  SoftcapKernel<<<Blocks(n), 256, 0, stream>>>(x, n, cap);
  return cudaGetLastError();
}

cudaError_t MaskTokens(float* x, int64_t rows, int64_t cols, const uint64_t* masks, int64_t words,
                       const int32_t* row_slot, int64_t first_bit, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>((cols + 255) / 256, 256)),
                  static_cast<unsigned>(rows));
  MaskTokensKernel<<<grid, 256, 0, stream>>>(x, cols, masks, words, row_slot, first_bit);
  return cudaGetLastError();
}

cudaError_t GatherRows(const bf16* x, int64_t cols, const int64_t* rows, int64_t count, bf16* out,
                       cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  GatherRowsKernel<<<static_cast<unsigned>(count), 256, 0, stream>>>(x, cols, rows, out);
  return cudaGetLastError();
}

cudaError_t ScatterColumns(const float* src, int64_t rows, int64_t src_cols, int64_t offset,
                           float* dst, int64_t dst_cols, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(256, (dst_cols + 255) / 256)),
                  static_cast<unsigned>(rows));
  ScatterColumnsKernel<<<grid, 256, 0, stream>>>(src, src_cols, offset, dst, dst_cols);
  return cudaGetLastError();
}

cudaError_t AddBias(void* out, bool out_is_f32, const bf16* bias, int64_t rows, int64_t cols,
                    cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (out_is_f32) {
    AddBiasKernel<float><<<static_cast<unsigned>(rows), 128, 0, stream>>>(static_cast<float*>(out), bias, cols);
  } else {
    AddBiasKernel<bf16><<<static_cast<unsigned>(rows), 128, 0, stream>>>(static_cast<bf16*>(out), bias, cols);
  }
  return cudaGetLastError();
}

size_t ArgmaxScratchBytes(int64_t rows) {
  return static_cast<size_t>(rows * kArgmaxChunks) * (sizeof(float) + sizeof(int64_t));
}

cudaError_t ArgmaxRows(const float* x, int64_t rows, int64_t cols, void* scratch, int32_t* ids,
                       cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  auto* part_i = static_cast<int64_t*>(scratch);
  auto* part_v = reinterpret_cast<float*>(part_i + rows * kArgmaxChunks);
  ArgmaxPartialKernel<<<dim3(kArgmaxChunks, static_cast<unsigned>(rows)), 256, 0, stream>>>(x, cols, part_v, part_i);
  ArgmaxFinalKernel<<<CeilDiv(rows, 128), 128, 0, stream>>>(part_v, part_i, rows, cols, ids);
  return cudaGetLastError();
}

cudaError_t Poison(void* p, int64_t bytes, cudaStream_t stream) {
  return cudaMemsetAsync(p, 0xff, static_cast<size_t>(bytes), stream);  // bf16/fp32 NaN
}

}  // namespace gemma2::kernels
