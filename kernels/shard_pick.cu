#include "common/sampling_noise.h"
#include "kernels/device.cuh"
#include "kernels/shard_pick.h"

namespace gemma2::kernels {
namespace {

constexpr int kChunks = 32;  // column chunks per row in the first pass
constexpr int kThreads = 256;

// (score, column) with FillShardPick's order: the larger score, then the lower column; -1: none.
struct Best {
  float s;
  int32_t j;
};

__device__ __forceinline__ bool Beats(const Best& a, const Best& b) {
  return a.j >= 0 && (b.j < 0 || a.s > b.s || (a.s == b.s && a.j < b.j));
}

// Pass 1: block (chunk, row) finds its slice's best.
__global__ void __launch_bounds__(kThreads)
    ShardBestPartialKernel(const float* __restrict__ local, int64_t shard, int64_t vocab_begin,
                           const DeviceSampling* __restrict__ params, Best* __restrict__ part) {
  const int64_t r = blockIdx.y;
  const DeviceSampling p = params[r];
  const int64_t per = (shard + kChunks - 1) / kChunks;
  const int64_t lo = blockIdx.x * per, hi = min(shard, lo + per);
  const float* x = local + r * shard;
  Best best{-INFINITY, -1};
  for (int64_t j = lo + threadIdx.x; j < hi; j += kThreads) {
    const float s =
        p.greedy ? x[j]
                 : x[j] / p.temperature +
                       GumbelNoise(p.seed, p.counter, static_cast<uint64_t>(vocab_begin + j));
    if (best.j < 0 || s > best.s) best = {s, static_cast<int32_t>(j)};
  }
  __shared__ Best buf[kThreads];
  buf[threadIdx.x] = best;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s && Beats(buf[threadIdx.x + s], buf[threadIdx.x]))
      buf[threadIdx.x] = buf[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) part[r * kChunks + blockIdx.x] = buf[0];
}

// Pass 2: one thread per row merges the chunks and writes the row's whole exchange.
__global__ void ShardBestFinalKernel(const Best* __restrict__ part, int64_t rows,
                                     int64_t vocab_begin, int rank, int tp,
                                     float* __restrict__ exchange) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r >= rows) return;
  Best best{-INFINITY, -1};
  for (int c = 0; c < kChunks; ++c) {
    if (Beats(part[r * kChunks + c], best)) best = part[r * kChunks + c];
  }
  float* row = exchange + r * tp * 2;
  for (int k = 0; k < tp; ++k) {
    row[2 * k] = k == rank ? best.s : 0.0f;
    row[2 * k + 1] = k != rank    ? 0.0f
                     : best.j < 0 ? -1.0f
                                  : static_cast<float>(vocab_begin + best.j);
  }
}

__global__ void DecideShardKernel(const float* __restrict__ exchange, int64_t rows, int tp,
                                  int32_t* __restrict__ ids) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r >= rows) return;
  const float* row = exchange + r * tp * 2;
  float best = -INFINITY;
  int64_t best_id = -1;
  for (int k = 0; k < tp; ++k) {
    if (row[2 * k + 1] < 0) continue;
    if (best_id < 0 || row[2 * k] > best) {
      best = row[2 * k];
      best_id = static_cast<int64_t>(row[2 * k + 1]);
    }
  }
  ids[r] = static_cast<int32_t>(best_id < 0 ? 0 : best_id);
}

unsigned RowBlocks(int64_t rows) { return static_cast<unsigned>((rows + 127) / 128); }

}  // namespace

size_t ShardBestScratchBytes(int64_t rows) {
  return static_cast<size_t>(rows) * kChunks * sizeof(Best);
}

cudaError_t ShardBestRows(const float* local, int64_t rows, int64_t shard, int64_t vocab_begin,
                          const DeviceSampling* params, int rank, int tp, void* scratch,
                          float* exchange, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  auto* part = static_cast<Best*>(scratch);
  ShardBestPartialKernel<<<dim3(kChunks, static_cast<unsigned>(rows)), kThreads, 0, stream>>>(
      local, shard, vocab_begin, params, part);
  ShardBestFinalKernel<<<RowBlocks(rows), 128, 0, stream>>>(part, rows, vocab_begin, rank, tp,
                                                            exchange);
  return cudaGetLastError();
}

cudaError_t DecideShardRows(const float* exchange, int64_t rows, int tp, int32_t* ids,
                            cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  DecideShardKernel<<<RowBlocks(rows), 128, 0, stream>>>(exchange, rows, tp, ids);
  return cudaGetLastError();
}

}  // namespace gemma2::kernels
