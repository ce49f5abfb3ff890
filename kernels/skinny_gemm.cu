#include "kernels/device.cuh"
#include "kernels/skinny_gemm.h"

namespace gemma2::kernels {
namespace {

constexpr int kWarps = 4;      // warps per block, splitting the block's K range
constexpr int kTileRows = 16;  // mma M
constexpr int kTiles = 2;      // M tiles per warp: 32 weight rows share each token fragment
constexpr int kRows = kTileRows * kTiles;
constexpr int kChunk = 32;  // K per warp iteration: two mma k-steps of 16

// D = A·B + D for one m16n8k16 tile, bf16 inputs, fp32 accumulators.
__device__ __forceinline__ void Mma(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                    uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Block (m, s): weight rows [32m, 32m + 32), chunks of K in split s. Lane (g = lane / 4,
// q = lane % 4) loads 8 consecutive k of rows g and g + 8 of each tile and of token g of each
// n-tile (16 bytes each); a dot product may take its k in any order as long as both operands
// agree, so those 8 k feed two mma k-steps as the fragments' (2q, 2q+1, 2q+8, 2q+9) positions.
template <int NT, int U>
__global__ void __launch_bounds__(32 * kWarps)
    SkinnyKernel(const bf16* __restrict__ x, const bf16* __restrict__ w, void* out, bool out_f32,
                 int tokens, int64_t n, int64_t k, int splits, float* __restrict__ partial) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, q = lane & 3;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t chunks = k / kChunk;
  const int64_t per_split = (chunks + splits - 1) / splits;
  const int64_t c_begin = blockIdx.y * per_split, c_end = min(chunks, c_begin + per_split);

  const uint4* wr[kTiles][2];
#pragma unroll
  for (int m = 0; m < kTiles; ++m) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t row = min(row0 + m * kTileRows + h * 8 + g, n - 1);  // past n: not written
      wr[m][h] = reinterpret_cast<const uint4*>(w + row * k) + q;
    }
  }
  const uint4* xr[NT];
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    const int64_t t = min(j * 8 + g, tokens - 1);  // past the tokens: not written
    xr[j] = reinterpret_cast<const uint4*>(x + t * k) + q;
  }
  float acc[kTiles][NT][4];
#pragma unroll
  for (int m = 0; m < kTiles; ++m)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[m][j][e] = 0.0f;

  auto compute = [&](const uint4(&a)[kTiles][2], const uint4(&b)[NT]) {
#pragma unroll
    for (int m = 0; m < kTiles; ++m) {
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        Mma(acc[m][j], a[m][0].x, a[m][1].x, a[m][0].y, a[m][1].y, b[j].x, b[j].y);
        Mma(acc[m][j], a[m][0].z, a[m][1].z, a[m][0].w, a[m][1].w, b[j].z, b[j].w);
      }
    }
  };
  int64_t c = c_begin + warp;
  for (; c + (U - 1) * kWarps < c_end; c += U * kWarps) {  // U chunks in flight
    uint4 a[U][kTiles][2], b[U][NT];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t off = (c + u * kWarps) * 4;
#pragma unroll
      for (int m = 0; m < kTiles; ++m) {
        a[u][m][0] = __ldcs(wr[m][0] + off);  // streamed once: do not keep in cache
        a[u][m][1] = __ldcs(wr[m][1] + off);
      }
#pragma unroll
      for (int j = 0; j < NT; ++j) b[u][j] = __ldg(xr[j] + off);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) compute(a[u], b[u]);
  }
  for (; c < c_end; c += kWarps) {
    uint4 a[kTiles][2], b[NT];
    const int64_t off = c * 4;
#pragma unroll
    for (int m = 0; m < kTiles; ++m) {
      a[m][0] = __ldcs(wr[m][0] + off);
      a[m][1] = __ldcs(wr[m][1] + off);
    }
#pragma unroll
    for (int j = 0; j < NT; ++j) b[j] = __ldg(xr[j] + off);
    compute(a, b);
  }

  // Sum the warps: accumulator (m, j, e) is row 16m + g + 8(e / 2), token 8j + 2q + e % 2.
  __shared__ float red[kWarps][kRows][NT * 8];
#pragma unroll
  for (int m = 0; m < kTiles; ++m)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        red[warp][m * kTileRows + g + 8 * (e >> 1)][j * 8 + 2 * q + (e & 1)] = acc[m][j][e];
  __syncthreads();
  for (int i = threadIdx.x; i < kRows * NT * 8; i += blockDim.x) {
    const int t = i / kRows, r = i % kRows;  // consecutive threads: consecutive rows
    const int64_t row = row0 + r;
    if (t >= tokens || row >= n) continue;
    float v = 0.0f;
#pragma unroll
    for (int wi = 0; wi < kWarps; ++wi) v += red[wi][r][t];
    if (splits > 1) {
      partial[(static_cast<int64_t>(blockIdx.y) * tokens + t) * n + row] = v;
    } else if (out_f32) {
      static_cast<float*>(out)[t * n + row] = v;
    } else {
      static_cast<bf16*>(out)[t * n + row] = ToB(v);
    }
  }
}

__global__ void SumSplits(const float* __restrict__ partial, int splits, int64_t count, void* out,
                          bool out_f32) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= count) return;
  float v = 0.0f;
  for (int s = 0; s < splits; ++s) v += partial[s * count + i];
  if (out_f32) {
    static_cast<float*>(out)[i] = v;
  } else {
    static_cast<bf16*>(out)[i] = ToB(v);
  }
}

int Multiprocessors() {
  static const int count = [] {
    int device = 0, sms = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
      return 132;
    }
    return sms;
  }();
  return count;
}

// K splits over blocks: enough blocks for four per multiprocessor, each warp keeping at least
// four chunks of K.
int Splits(int64_t n, int64_t k) {
  const int64_t tiles = (n + kRows - 1) / kRows, chunks = k / kChunk;
  int s = 1;
  while (tiles * s < 4 * Multiprocessors() && chunks / (2 * s) >= 4 * kWarps) s *= 2;
  return s;
}

template <int NT, int U>
cudaError_t Launch(const bf16* x, const bf16* w, void* out, bool out_f32, int64_t tokens, int64_t n,
                   int64_t k, float* scratch, cudaStream_t stream) {
  const int splits = Splits(n, k);
  const dim3 grid(CeilDiv(n, kRows), static_cast<unsigned>(splits));
  SkinnyKernel<NT, U><<<grid, 32 * kWarps, 0, stream>>>(
      x, w, out, out_f32, static_cast<int>(tokens), n, k, splits, scratch);
  if (splits > 1) {
    const int64_t count = tokens * n;
    SumSplits<<<CeilDiv(count, 256), 256, 0, stream>>>(scratch, splits, count, out, out_f32);
  }
  return cudaGetLastError();
}

}  // namespace

bool SkinnyGemmSupports(const void* x, const void* w, int64_t tokens, int64_t k) {
  return tokens >= 1 && tokens <= kSkinnyMaxTokens && k > 0 && k % kChunk == 0 &&
         reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(w) % 16 == 0;
}

size_t SkinnyGemmScratchBytes(int64_t tokens, int64_t n, int64_t k) {
  if (k % kChunk != 0) return 0;
  const int splits = Splits(n, k);
  return splits > 1 ? static_cast<size_t>(splits * tokens * n) * sizeof(float) : 0;
}

cudaError_t SkinnyGemm(const bf16* x, const bf16* w, void* out, bool out_f32, int64_t tokens,
                       int64_t n, int64_t k, float* scratch, cudaStream_t stream) {
  if (!SkinnyGemmSupports(x, w, tokens, k) || n <= 0) return cudaErrorInvalidValue;
  if (SkinnyGemmScratchBytes(tokens, n, k) > 0 && scratch == nullptr) return cudaErrorInvalidValue;
  if (tokens <= 8) return Launch<1, 4>(x, w, out, out_f32, tokens, n, k, scratch, stream);
  if (tokens <= 16) return Launch<2, 4>(x, w, out, out_f32, tokens, n, k, scratch, stream);
  return Launch<4, 2>(x, w, out, out_f32, tokens, n, k, scratch, stream);
}

}  // namespace gemma2::kernels
