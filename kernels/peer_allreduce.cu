#include "kernels/device.cuh"
#include "kernels/peer_allreduce.h"

namespace gemma2::kernels {
namespace {

constexpr int kThreads = 512;
constexpr int kPer = 16;  // values per thread (hidden <= 8192), kept in registers

__device__ __forceinline__ void StoreRelease(uint32_t* p, uint32_t v) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ uint32_t LoadAcquire(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ uint64_t Now() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// One block per row. The row block's call number c (the same on every rank) picks the inbox
// parity: a source writes parity c % 2 only after every rank arrived at call c - 1, so nobody
// still reads what it overwrites.
__global__ void __launch_bounds__(kThreads)
    PeerAddRmsNormKernel(PeerGroupView g, bf16* residual, const bf16* delta, const bf16* post_w,
                         const bf16* next_w, float eps, bf16* normed, uint64_t timeout_ns) {
  const int64_t row = blockIdx.x, hidden = g.hidden;
  __shared__ uint32_t call;
  if (threadIdx.x == 0) call = ++g.calls[row];
  __syncthreads();
  const uint32_t c = call;
  const int64_t parity = c & 1;
  // Push this rank's row into slot [parity][rank][row] of every inbox, 16 bytes at a time.
  const int64_t my_slot = ((parity * g.size + g.rank) * g.max_rows + row) * hidden;
  const int4* src = reinterpret_cast<const int4*>(delta + row * hidden);
  for (int64_t v = threadIdx.x; v < hidden / 8; v += kThreads) {
    const int4 x = src[v];
    for (int k = 0; k < g.size; ++k) reinterpret_cast<int4*>(g.inbox[k] + my_slot)[v] = x;
  }
  __threadfence_system();  // every thread's pushes, before the flags say they are there
  __syncthreads();
  if (threadIdx.x < g.size) {
    StoreRelease(g.flags[threadIdx.x] + row * kMaxPeers + g.rank, c);
    // Wait for source threadIdx.x's row (counters only grow: a faster peer may be one call on).
    const uint32_t* mine = g.flags[g.rank] + row * kMaxPeers + threadIdx.x;
    const uint64_t deadline = Now() + timeout_ns;
    while (static_cast<int32_t>(LoadAcquire(mine) - c) < 0) {
      if (Now() > deadline) __trap();
    }
  }
  __syncthreads();
  // The sum in rank order, fp32, rounded once; then AddRmsNorm's arithmetic.
  const bf16* in = g.inbox[g.rank] + parity * g.size * g.max_rows * hidden + row * hidden;
  bf16* res = residual + row * hidden;
  float dv[kPer], rv[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int64_t j = threadIdx.x + static_cast<int64_t>(i) * kThreads;
    float s = 0;
    if (j < hidden) {
      for (int k = 0; k < g.size; ++k) s += ToF(__ldcg(in + k * g.max_rows * hidden + j));
    }
    dv[i] = ToF(ToB(s));
    rv[i] = j < hidden ? ToF(res[j]) : 0.0f;
  }
  AddRmsNormRow<kThreads, kPer>(dv, rv, hidden, eps, post_w, next_w, res,
                                next_w ? normed + row * hidden : nullptr);
}

}  // namespace

size_t PeerInboxBytes(int size, int64_t max_rows, int64_t hidden) {
  return static_cast<size_t>(2 * size * max_rows * hidden) * sizeof(bf16);
}

size_t PeerFlagBytes(int64_t max_rows) {
  return static_cast<size_t>(max_rows * kMaxPeers) * sizeof(uint32_t);
}

cudaError_t PeerAllReduceAddRmsNorm(const PeerGroupView& g, bf16* residual, const bf16* delta,
                                    const bf16* post_w, const bf16* next_w, int64_t rows, float eps,
                                    bf16* normed, uint64_t timeout_ns, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (rows > g.max_rows || g.hidden % 8 != 0 || g.hidden > int64_t{kThreads} * kPer ||
      g.size > kMaxPeers || g.size < 1) {
    return cudaErrorInvalidValue;
  }
  PeerAddRmsNormKernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
      g, residual, delta, post_w, next_w, eps, normed, timeout_ns);
  return cudaGetLastError();
}

}  // namespace gemma2::kernels
