#include "kernels/device.cuh"
#include "kernels/flash_attention.h"

namespace gemma2::kernels {
namespace {

constexpr int kHd = 128;
constexpr int kWarps = 4;
constexpr int kQueries = 16 * kWarps;  // per block: 16 rows per warp (one mma M)
constexpr int kKeys = 64;              // per tile
constexpr int kStride = kHd + 8;       // shared row pitch in elements: ldmatrix rows hit 8 banks
constexpr float kLog2e = 1.4426950408889634f;

// Four 8x8 bf16 matrices; lane l gives the address of row l % 8 of matrix l / 8. Without .trans
// lane 4r + w receives elements (r, 2w..2w+1) of each; with .trans, (2w..2w+1, r).
__device__ __forceinline__ void LdMatrix(uint32_t (&r)[4], const bf16* row) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}
__device__ __forceinline__ void LdMatrixTrans(uint32_t (&r)[4], const bf16* row) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

__device__ __forceinline__ void CopyAsync16(bf16* dst, const bf16* src) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(a), "l"(src));
}
__device__ __forceinline__ void CommitAsync() { asm volatile("cp.async.commit_group;\n"); }
template <int N>
__device__ __forceinline__ void WaitAsync() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ uint32_t Pack(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// One 64-key tile of one kv head (K or V) into shared memory; keys past the sequence repeat the
// last one (they are masked).
__device__ __forceinline__ void LoadTile(bf16 (*dst)[kStride], const bf16* qkv, int64_t stride,
                                         int64_t col, int key0, int tokens) {
  for (int i = threadIdx.x; i < kKeys * kHd / 8; i += blockDim.x) {
    const int r = i / (kHd / 8), c = (i % (kHd / 8)) * 8;
    const int key = min(key0 + r, tokens - 1);
    CopyAsync16(&dst[r][c], qkv + key * stride + col + c);
  }
}

// Block (tile, head): queries [64 tile, 64 tile + 64) of q head `head`. Warp w owns 16 of them;
// lane (g = lane / 4, q = lane % 4) holds rows g and g + 8 of every mma fragment.
__global__ void __launch_bounds__(32 * kWarps)
    FlashKernel(const bf16* __restrict__ qkv, PrefillAttentionShape s, bf16* __restrict__ out) {
  __shared__ __align__(16) bf16 ks[kKeys][kStride];
  __shared__ __align__(16) bf16 vs[kKeys][kStride];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, q = lane & 3;
  const int tokens = static_cast<int>(s.tokens);
  const int tile = gridDim.x - 1 - blockIdx.x;  // the longest rows first
  const int head = blockIdx.y;
  const int kv_head = head / static_cast<int>(s.q_heads / s.kv_heads);
  const int64_t stride = s.row_stride;
  const int64_t k_col = (s.q_heads + kv_head) * kHd;
  const int64_t v_col = (s.q_heads + s.kv_heads + kv_head) * kHd;
  const int q0 = tile * kQueries;
  const int row_a = q0 + warp * 16 + g, row_b = row_a + 8;  // this lane's two query rows
  const int window = static_cast<int>(s.window);

  // Q as A fragments for the 8 k-steps of 16 dims, scaled into the log2 domain later.
  uint32_t qa[kHd / 16][4];
  {
    const bf16* pa = qkv + min(row_a, tokens - 1) * stride + head * kHd + 2 * q;
    const bf16* pb = qkv + min(row_b, tokens - 1) * stride + head * kHd + 2 * q;
#pragma unroll
    for (int kk = 0; kk < kHd / 16; ++kk) {
      qa[kk][0] = *reinterpret_cast<const uint32_t*>(pa + kk * 16);
      qa[kk][1] = *reinterpret_cast<const uint32_t*>(pb + kk * 16);
      qa[kk][2] = *reinterpret_cast<const uint32_t*>(pa + kk * 16 + 8);
      qa[kk][3] = *reinterpret_cast<const uint32_t*>(pb + kk * 16 + 8);
    }
  }
  float o[kHd / 8][4];
#pragma unroll
  for (int d = 0; d < kHd / 8; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};  // log2 domain; l lane-partial

  const int last_query = min(q0 + kQueries, tokens) - 1;
  const int first_key = window > 0 ? max(0, q0 - window + 1) : 0;
  const int t_end = last_query / kKeys;
  for (int kt = first_key / kKeys; kt <= t_end; ++kt) {
    const int key0 = kt * kKeys;
    __syncthreads();  // every warp is done with the previous tile
    LoadTile(ks, qkv, stride, k_col, key0, tokens);
    CommitAsync();
    LoadTile(vs, qkv, stride, v_col, key0, tokens);
    CommitAsync();
    WaitAsync<1>();  // K has landed; V may still be in flight
    __syncthreads();

    // S = Q Kᵀ for 16 rows x 64 keys: key n-tiles j, j + 1 from one ldmatrix per k-step.
    float sc[kKeys / 8][4];
#pragma unroll
    for (int j = 0; j < kKeys / 8; ++j) sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.0f;
    const int mi = lane >> 3, mr = lane & 7;
#pragma unroll
    for (int kk = 0; kk < kHd / 16; ++kk) {
#pragma unroll
      for (int j = 0; j < kKeys / 8; j += 2) {
        uint32_t b[4];
        LdMatrix(b, &ks[j * 8 + mr + 8 * (mi >> 1)][kk * 16 + 8 * (mi & 1)]);
        MmaBf16(sc[j], qa[kk], b[0], b[1]);
        MmaBf16(sc[j + 1], qa[kk], b[2], b[3]);
      }
    }
    // Scale, softcap, mask; the rows' maxima across the quad that shares them.
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < kKeys / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = key0 + j * 8 + 2 * q + (e & 1);
        const int row = (e >> 1) ? row_b : row_a;
        float v = sc[j][e] * s.scale;
        if (s.softcap > 0) v = tanhf(v / s.softcap) * s.softcap;
        const bool visible = key <= row && key < tokens && (window == 0 || row - key < window);
        v = visible ? v * kLog2e : -INFINITY;
        sc[j][e] = v;
        mx[e >> 1] = fmaxf(mx[e >> 1], v);
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
      const float m_new = fmaxf(m[h], mx[h]);
      const float base = m_new == -INFINITY ? 0.0f : m_new;  // a row with nothing visible yet
      const float corr = exp2f(m[h] - base);
      l[h] *= corr;
#pragma unroll
      for (int d = 0; d < kHd / 8; ++d) {
        o[d][2 * h] *= corr;
        o[d][2 * h + 1] *= corr;
      }
      m[h] = m_new;
      mx[h] = base;
    }
    uint32_t pa[kKeys / 16][4];  // P as A fragments for the 4 k-steps of 16 keys
#pragma unroll
    for (int j = 0; j < kKeys / 8; ++j) {
      const float p0 = exp2f(sc[j][0] - mx[0]), p1 = exp2f(sc[j][1] - mx[0]);
      const float p2 = exp2f(sc[j][2] - mx[1]), p3 = exp2f(sc[j][3] - mx[1]);
      l[0] += p0 + p1;
      l[1] += p2 + p3;
      pa[j >> 1][(j & 1) * 2] = Pack(p0, p1);
      pa[j >> 1][(j & 1) * 2 + 1] = Pack(p2, p3);
    }

    WaitAsync<0>();
    __syncthreads();
    // O += P V: dims n-tiles d, d + 1 from one transposing ldmatrix per k-step of 16 keys.
#pragma unroll
    for (int kv = 0; kv < kKeys / 16; ++kv) {
#pragma unroll
      for (int d = 0; d < kHd / 8; d += 2) {
        uint32_t b[4];
        LdMatrixTrans(b, &vs[kv * 16 + mr + 8 * (mi & 1)][d * 8 + 8 * (mi >> 1)]);
        MmaBf16(o[d], pa[kv], b[0], b[1]);
        MmaBf16(o[d + 1], pa[kv], b[2], b[3]);
      }
    }
  }

#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
  }
  const int64_t out_stride = s.q_heads * kHd;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = h ? row_b : row_a;
    if (row >= tokens) continue;
    const float inv = 1.0f / l[h];
    bf16* dst = out + row * out_stride + head * kHd + 2 * q;
#pragma unroll
    for (int d = 0; d < kHd / 8; ++d) {
      *reinterpret_cast<uint32_t*>(dst + d * 8) = Pack(o[d][2 * h] * inv, o[d][2 * h + 1] * inv);
    }
  }
}

}  // namespace

bool FlashPrefillSupports(const PrefillAttentionShape& s) {
  return s.head_dim == kHd && s.kv_heads > 0 && s.q_heads % s.kv_heads == 0 && s.tokens > 0 &&
         s.row_stride % 8 == 0;
}

cudaError_t FlashPrefillAttention(const bf16* qkv, const PrefillAttentionShape& s, bf16* out,
                                  cudaStream_t stream) {
  if (!FlashPrefillSupports(s) || reinterpret_cast<uintptr_t>(qkv) % 16 != 0)
    return cudaErrorInvalidValue;
  const dim3 grid(CeilDiv(s.tokens, kQueries), static_cast<unsigned>(s.q_heads));
  FlashKernel<<<grid, 32 * kWarps, 0, stream>>>(qkv, s, out);
  return cudaGetLastError();
}

}  // namespace gemma2::kernels
