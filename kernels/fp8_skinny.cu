// The FP8-weight product for 9..16 tokens on the tensor cores (see fp8.h): weights dequantized to
// bf16 in registers (exact), activations read as they are, fp32 accumulation.
//
// Work: a block owns 32 weight rows (two 16-row mma tiles) and one of `splits` K ranges; its 4
// warps take that range's 64-wide chunks in turn, so the block reads 256 contiguous bytes of each
// row at a time. In a chunk, lane 4g + t loads 16 weights of rows g, g+8, g+16, g+24 at k offset
// 16t (one 16-byte load each; the next chunk's load while this one multiplies) and 16 activations
// of token g of each 8-token tile at the same offsets. The mma's k index is only a name: logical
// k 2t+e of step s is physical 16t + 4s + e, and 2t+8+e is 16t + 4s + 2 + e, the same on both
// operands, so every fragment comes from those loads without a shuffle. The warps' partial sums
// meet in shared memory; with several splits each block writes its sum to `partial` and the last
// block of a row group (an arrival counter it resets) adds the splits in split order: the result
// does not depend on which block finishes first.
//
// Why 16 tokens at most: every block reads all the tokens' activations of its K range from L2,
// tokens x 2 / 32 times the bytes of its weights, which past 16 tokens costs more than the
// tensor cores save. Measured on the H200 (27B, FP8 weights and cache, gemma2-bench decode
// p128, bench/results/2026-12-03e-fp8-skinny-h200.txt): batch 16 12.38 ms against cuBLASLt's
// 15.61; batch 64 43.98 against 15.70. Three variants that shared activations among more rows
// (128-row blocks through L1; cp.async rings of 128- or 512-k stages) were slower than cuBLASLt
// at 16 tokens too (16.8-18.8 ms).
#include <cuda_fp8.h>

#include <algorithm>

#include "kernels/device.cuh"
#include "kernels/fp8.h"

namespace gemma2::kernels {
namespace {

constexpr int kWarps = 4;
constexpr int kRows = 32;   // weight rows per block
constexpr int kChunk = 64;  // k per warp step
constexpr int kTiles = 2;   // 8-token tiles

// 16 E4M3 weights into 8 bf16 pairs (every E4M3 value is a bf16 value).
__device__ __forceinline__ void Fp8x16ToBf16(const uint4& w, uint32_t (&out)[8]) {
  const auto* p = reinterpret_cast<const __nv_fp8x2_storage_t*>(&w);
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const __half2 h = __half2(__nv_cvt_fp8x2_to_halfraw2(p[i], __NV_E4M3));
    const __nv_bfloat162 b = __float22bfloat162_rn(__half22float2(h));
    out[i] = *reinterpret_cast<const uint32_t*>(&b);
  }
}

__global__ void __launch_bounds__(32 * kWarps)
    SkinnyFp8Kernel(const bf16* x, const fp8* w, const float* scale, void* out, bool out_f32,
                    int tokens, int64_t n, int64_t k, int splits, float* partial,
                    unsigned* arrivals) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int split = static_cast<int>(blockIdx.y);
  const int64_t chunks = k / kChunk;
  const int64_t c_begin = chunks * split / splits, c_end = chunks * (split + 1) / splits;
  const fp8* wr[4];  // rows g, g+8 of tile 0, then of tile 1
#pragma unroll
  for (int i = 0; i < 4; ++i) wr[i] = w + (row0 + 8 * i + g) * k + 16 * t;
  float acc[2][kTiles][4];
#pragma unroll
  for (int m = 0; m < 2; ++m)
#pragma unroll
    for (int j = 0; j < kTiles; ++j) {
      acc[m][j][0] = acc[m][j][1] = acc[m][j][2] = acc[m][j][3] = 0.0f;
    }
  // The next chunk's weights load while this one multiplies.
  uint4 wv[4], next[4];
  auto load = [&](int64_t c, uint4(&v)[4]) {
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] = __ldcs(reinterpret_cast<const uint4*>(wr[i] + c * kChunk));
  };
  if (c_begin + warp < c_end) load(c_begin + warp, wv);
  for (int64_t c = c_begin + warp; c < c_end; c += kWarps) {
    if (c + kWarps < c_end) load(c + kWarps, next);
    uint32_t a[4][8];
#pragma unroll
    for (int i = 0; i < 4; ++i) Fp8x16ToBf16(wv[i], a[i]);
#pragma unroll
    for (int j = 0; j < kTiles; ++j) {
      const int token = 8 * j + g;
      uint4 x0 = make_uint4(0, 0, 0, 0), x1 = x0;
      if (token < tokens) {
        const uint4* xp = reinterpret_cast<const uint4*>(x + token * k + c * kChunk + 16 * t);
        x0 = __ldg(xp);
        x1 = __ldg(xp + 1);
      }
      const uint32_t b[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
#pragma unroll
      for (int s = 0; s < 4; ++s) {
#pragma unroll
        for (int m = 0; m < 2; ++m) {
          const uint32_t frag[4] = {a[2 * m][2 * s], a[2 * m + 1][2 * s], a[2 * m][2 * s + 1],
                                    a[2 * m + 1][2 * s + 1]};
          MmaBf16(acc[m][j], frag, b[2 * s], b[2 * s + 1]);
        }
      }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) wv[i] = next[i];
  }
  // The warps' sums: red[warp][row][token], padded against bank conflicts. acc[m][j][i] is row
  // 16m + g + 8 (i / 2), token 8j + 2t + i % 2.
  constexpr int kCols = 8 * kTiles + 1;
  __shared__ float red[kWarps][kRows][kCols];
#pragma unroll
  for (int m = 0; m < 2; ++m)
#pragma unroll
    for (int j = 0; j < kTiles; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        red[warp][16 * m + g + 8 * (i >> 1)][8 * j + 2 * t + (i & 1)] = acc[m][j][i];
      }
  __syncthreads();
  auto store = [&](int64_t row, int token, float v) {
    const int64_t at = token * n + row;
    v *= scale[row];
    if (out_f32) {
      static_cast<float*>(out)[at] = v;
    } else {
      static_cast<bf16*>(out)[at] = ToB(v);
    }
  };
  for (int e = threadIdx.x; e < kRows * tokens; e += 32 * kWarps) {
    const int r = e % kRows, token = e / kRows;  // consecutive threads: consecutive rows
    float v = 0.0f;
#pragma unroll
    for (int i = 0; i < kWarps; ++i) v += red[i][r][token];
    if (splits == 1) {
      store(row0 + r, token, v);
    } else {
      partial[(static_cast<int64_t>(split) * tokens + token) * n + row0 + r] = v;
    }
  }
  if (splits == 1) return;
  __threadfence();  // this block's partials, before its arrival
  __syncthreads();
  __shared__ bool last;
  if (threadIdx.x == 0) {
    last = atomicAdd(&arrivals[blockIdx.x], 1u) == static_cast<unsigned>(splits - 1);
  }
  __syncthreads();
  if (!last) return;
  __threadfence();  // the other blocks' partials, after their arrivals
  for (int e = threadIdx.x; e < kRows * tokens; e += 32 * kWarps) {
    const int r = e % kRows, token = e / kRows;
    float v = 0.0f;
    for (int s = 0; s < splits; ++s) {
      v += __ldcg(&partial[(static_cast<int64_t>(s) * tokens + token) * n + row0 + r]);
    }
    store(row0 + r, token, v);
  }
  if (threadIdx.x == 0) arrivals[blockIdx.x] = 0;  // ready for the next product
}

}  // namespace

bool SkinnyFp8Supports(const void* x, const void* w, int64_t tokens, int64_t n, int64_t k) {
  return tokens >= 1 && tokens <= kSkinnyFp8MaxTokens && n % kRows == 0 && n > 0 &&
         k % kChunk == 0 && k > 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(w) % 16 == 0;
}

int SkinnyFp8Splits(int64_t n, int64_t k) {
  const int sms = DeviceSmCount();
  const int64_t groups = n / kRows, chunks = k / kChunk;
  if (groups > kSkinnyFp8MaxSplitGroups) return 1;
  // Two blocks per SM, each warp at least one chunk.
  const int64_t want = (2 * sms + groups - 1) / groups;
  return static_cast<int>(std::max<int64_t>(1, std::min({want, chunks / kWarps, int64_t{8}})));
}

cudaError_t SkinnyFp8(const bf16* x, const fp8* w, const float* scale, void* out, bool out_f32,
                      int64_t tokens, int64_t n, int64_t k, int splits, float* partial,
                      unsigned* arrivals, cudaStream_t stream) {
  if (!SkinnyFp8Supports(x, w, tokens, n, k) || splits < 1 ||
      (splits > 1 && (!partial || !arrivals || n / kRows > kSkinnyFp8MaxSplitGroups))) {
    return cudaErrorInvalidValue;
  }
  const dim3 grid(static_cast<unsigned>(n / kRows), static_cast<unsigned>(splits));
  SkinnyFp8Kernel<<<grid, 32 * kWarps, 0, stream>>>(
      x, w, scale, out, out_f32, static_cast<int>(tokens), n, k, splits, partial, arrivals);
  return cudaGetLastError();
}

}  // namespace gemma2::kernels
