// Device-only helpers for the kernels' .cu files: bf16 conversions, reductions, cache addressing.
#pragma once

#include "kernels/paged_kv.h"
#include "kernels/types.h"

namespace gemma2::kernels {

__device__ __forceinline__ float ToF(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ bf16 ToB(float x) { return __float2bfloat16_rn(x); }

// d += a * b on the tensor cores (m16n8k16, bf16 in, fp32 accumulate). Fragments as the PTX ISA
// gives them: lane 4g + t holds a = {A[g][2t..2t+1], A[g+8][2t..], A[g][2t+8..], A[g+8][2t+8..]},
// b = {B[2t..2t+1][g], B[2t+8..][g]}, d = {D[g][2t..2t+1], D[g+8][2t..2t+1]}.
__device__ __forceinline__ void MmaBf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                        uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// op over the whole block (blockDim.x a multiple of 32, at most 1024), `identity` filling the
// lanes past the block's warps; every thread gets the result.
template <class Op>
__device__ __forceinline__ float BlockReduce(float v, Op op, float identity) {
  __shared__ float partial[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  __syncthreads();  // partial[] may still be read by a previous call
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = lane < static_cast<int>((blockDim.x + 31) >> 5) ? partial[lane] : identity;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float BlockSum(float v) {
  return BlockReduce(v, [](float a, float b) { return a + b; }, 0.0f);
}
__device__ __forceinline__ float BlockMax(float v) {
  return BlockReduce(v, [](float a, float b) { return fmaxf(a, b); }, -INFINITY);
}

// The FP8 E4M3 scale of a row whose largest magnitude is amax: amax / 448, 1 for a zero or
// non-finite row (model/quantization.h RowScaleFp8, the same fp32 division).
__device__ __forceinline__ float Fp8RowScale(float amax) {
  return amax > 0.0f && isfinite(amax) ? __fdiv_rn(amax, 448.0f) : 1.0f;
}

// AddRmsNorm's arithmetic on one row held in registers, value i of each thread at column
// threadIdx.x + i * kThreads (dv: the delta, rv: the residual; zeros past `hidden`):
// res = bf16(rv + bf16(RmsNorm(dv, post_w))); then, if next_w: out = RmsNorm(res, next_w).
// Rounds where transformers' bf16 model rounds: the post-norm output, then the sum.
template <int kThreads, int kPer>
__device__ __forceinline__ void AddRmsNormRow(const float (&dv)[kPer], float (&rv)[kPer],
                                              int64_t hidden, float eps, const bf16* post_w,
                                              const bf16* next_w, bf16* res, bf16* out) {
  // Both weights are loaded before the first reduction, so their latency overlaps it.
  float pw[kPer], nw[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int64_t j = threadIdx.x + static_cast<int64_t>(i) * kThreads;
    pw[i] = j < hidden ? ToF(post_w[j]) : 0.0f;
    nw[i] = next_w != nullptr && j < hidden ? ToF(next_w[j]) : 0.0f;
  }
  float ss = 0;
#pragma unroll
  for (int i = 0; i < kPer; ++i) ss += dv[i] * dv[i];
  const float scale = rsqrtf(BlockSum(ss) / static_cast<float>(hidden) + eps);
  float ss2 = 0;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int64_t j = threadIdx.x + static_cast<int64_t>(i) * kThreads;
    if (j >= hidden) continue;
    const float n = ToF(ToB(dv[i] * scale * (1.0f + pw[i])));
    const bf16 sum = ToB(rv[i] + n);
    res[j] = sum;
    rv[i] = ToF(sum);
    ss2 += rv[i] * rv[i];
  }
  if (next_w == nullptr) return;
  const float scale2 = rsqrtf(BlockSum(ss2) / static_cast<float>(hidden) + eps);
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int64_t j = threadIdx.x + static_cast<int64_t>(i) * kThreads;
    if (j < hidden) out[j] = ToB(rv[i] * scale2 * (1.0f + nw[i]));
  }
}

__device__ __forceinline__ int64_t KvOffset(const PagedKv& kv, int32_t seq, int32_t pos,
                                            int32_t kv_head, int32_t head_dim) {
  const int32_t block =
      kv.block_tables[static_cast<int64_t>(seq) * kv.table_stride + pos / kv.block_size];
  return ((static_cast<int64_t>(block) * kv.kv_heads + kv_head) * kv.block_size +
          pos % kv.block_size) *
         head_dim;
}

}  // namespace gemma2::kernels
