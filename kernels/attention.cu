#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <type_traits>

#include "kernels/attention.h"
#include "kernels/device.cuh"

namespace gemma2::kernels {
namespace {

// Decode attention reads the whole KV cache every step, so the kernel is built around reading
// each cached key and value exactly once (GQA: once for all the query heads that share it) with
// 16-byte loads and many of them in flight.
//
// Block (t, bundle, split): token t, `R` query heads that share one kv head, split `split` of the
// keys visible to t. A key row (HD dims) is spread over HD / 16 lanes, each holding 16 dims (two
// 16-byte loads), so a warp covers 32 / (HD / 16) keys per load and kWarpKeys keys per iteration.
// Every lane group keeps an online softmax per head over its keys; groups merge by shuffles, warps
// through shared memory; the block writes the output (one split) or an unnormalized partial
// (max, sum, acc[HD]) per head for MergeKernel.
// Each warp loads its next round of keys before it computes the current one, so a warp has two
// rounds in flight — when the grid fits the GPU in one wave (kPrefetchWaveBlocksPerSm blocks per
// SM), where occupancy is not the limit: prefetching costs registers (27B's instance: 165 against
// 127), so larger grids (batch 64) keep the instance with more blocks per SM. Only instances
// whose registers allow it prefetch (head_dim x heads per block <= 512).
// Four warps, not eight: with the registers prefetching takes eight-warp blocks fit one per SM,
// and batch 16's 256 blocks would run in two waves.
// An FP8 cache (kFp8): a lane's 16 dims are one 16-byte load of E4M3 values, converted in
// registers; a key's scale multiplies its reduced score, a value's its softmax weight.
constexpr int kWarps = 4;
constexpr int kLaneDims = 16;
constexpr int kWarpKeys = 8;
// A split covers at least this many keys (eight rounds of the block's warps): a block's fixed
// cost (its query, the merge of its warps, a partial written and merged again) is paid for a
// useful amount of keys, and contexts up to this length need no merge kernel at all. Splits
// past the keys of a shorter query exit at once and the merge skips them.
constexpr int kMinSplitKeys = 8 * kWarps * kWarpKeys;
constexpr int kPrefetchWaveBlocksPerSm = 3;

// The keys visible to a query at `pos` ([first, pos]) and how many of `splits` cover them.
struct SplitRange {
  int32_t first, chunk, busy;
};
__device__ __forceinline__ SplitRange SplitKeys(int32_t pos, int32_t window, int splits) {
  const int32_t first = window > 0 ? max(0, pos - window + 1) : 0;
  const int32_t visible = pos - first + 1;
  const int32_t chunk = max((visible + splits - 1) / splits, kMinSplitKeys);
  return {first, chunk, (visible + chunk - 1) / chunk};
}

__device__ __forceinline__ void Unpack(const uint4& raw, float* f) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 x = __bfloat1622float2(h[i]);
    f[2 * i] = x.x;
    f[2 * i + 1] = x.y;
  }
}

// Weight of a softmax state with maximum m inside a merge with maximum big (0 for an empty one).
__device__ __forceinline__ float Rescale(float m, float big) {
  return m == -INFINITY ? 0.0f : __expf(m - big);
}

// 16 E4M3 values (one 16-byte load) as floats.
__device__ __forceinline__ void UnpackFp8(const uint4& raw, float* f) {
  const auto* p = reinterpret_cast<const __nv_fp8x2_storage_t*>(&raw);
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const float2 x = __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(p[i], __NV_E4M3)));
    f[2 * i] = x.x;
    f[2 * i + 1] = x.y;
  }
}

// 16-byte loads per lane and key: bf16 16 dims in two, E4M3 in one.
template <bool kFp8>
constexpr int kVec = kFp8 ? 1 : 2;

// One round of a lane's keys: kLoads keys (clamped to the last valid one; masked by the caller),
// kVec x 16 bytes of k and of v each, and with an FP8 cache their scales.
template <int HD, int kLoads, bool kFp8>
__device__ __forceinline__ void LoadRound(const PagedKv& kv, int32_t seq, int32_t g, int32_t k0,
                                          int32_t k_end, int group, int sub,
                                          uint4 (&kr)[kLoads][kVec<kFp8>],
                                          uint4 (&vr)[kLoads][kVec<kFp8>], float (&ks)[kLoads],
                                          float (&vs)[kLoads]) {
  constexpr int kKeysPerLoad = 32 / (HD / kLaneDims);
#pragma unroll
  for (int j = 0; j < kLoads; ++j) {
    const int32_t k = min(k0 + j * kKeysPerLoad + group, k_end - 1);
    const int64_t at = KvOffset(kv, seq, k, g, HD);
    const int64_t off = at + sub * kLaneDims;
    if constexpr (kFp8) {
      kr[j][0] = __ldg(reinterpret_cast<const uint4*>(kv.k8 + off));
      vr[j][0] = __ldg(reinterpret_cast<const uint4*>(kv.v8 + off));
      ks[j] = __ldg(kv.k_scale + at / HD);
      vs[j] = __ldg(kv.v_scale + at / HD);
    } else {
      const uint4* kp = reinterpret_cast<const uint4*>(kv.k + off);
      const uint4* vp = reinterpret_cast<const uint4*>(kv.v + off);
      kr[j][0] = __ldg(kp);
      kr[j][1] = __ldg(kp + 1);
      vr[j][0] = __ldg(vp);
      vr[j][1] = __ldg(vp + 1);
      ks[j] = vs[j] = 1.0f;
    }
  }
}

// A lane's 16 dims of a key or value as floats (unscaled for FP8).
template <bool kFp8>
__device__ __forceinline__ void LaneDims(const uint4 (&raw)[kVec<kFp8>], float (&f)[kLaneDims]) {
  if constexpr (kFp8) {
    UnpackFp8(raw[0], f);
  } else {
    Unpack(raw[0], f);
    Unpack(raw[1], f + 8);
  }
}

// One round of a lane group's keys k0 + [0, kWarpKeys) (those >= k_end masked) folded into its
// online softmax: scores with softcap, then the rescaled accumulation of the values.
template <int HD, int R, int kLoads, bool kFp8>
__device__ __forceinline__ void Round(const AttentionShape& shape, int32_t k0, int32_t k_end,
                                      int group, const float (&qv)[R][kLaneDims],
                                      const uint4 (&kr)[kLoads][kVec<kFp8>],
                                      const uint4 (&vr)[kLoads][kVec<kFp8>],
                                      const float (&ks)[kLoads], const float (&vs)[kLoads],
                                      float (&m)[R], float (&l)[R], float (&acc)[R][kLaneDims]) {
  constexpr int kGroupLanes = HD / kLaneDims;
  constexpr int kKeysPerLoad = 32 / kGroupLanes;
  float s[R][kLoads];
#pragma unroll
  for (int j = 0; j < kLoads; ++j) {
    float kf[kLaneDims];
    LaneDims<kFp8>(kr[j], kf);
    const bool valid = k0 + j * kKeysPerLoad + group < k_end;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float dot = 0.0f;
#pragma unroll
      for (int i = 0; i < kLaneDims; ++i) dot += qv[r][i] * kf[i];
#pragma unroll
      for (int o = kGroupLanes / 2; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
      if constexpr (kFp8) dot *= ks[j];
      if (shape.softcap > 0) dot = tanhf(dot / shape.softcap) * shape.softcap;
      s[r][j] = valid ? dot : -INFINITY;
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    float m_new = m[r];
#pragma unroll
    for (int j = 0; j < kLoads; ++j) m_new = fmaxf(m_new, s[r][j]);
    if (m_new == -INFINITY) continue;  // this group saw only masked keys so far
    const float corr = Rescale(m[r], m_new);
    l[r] *= corr;
#pragma unroll
    for (int i = 0; i < kLaneDims; ++i) acc[r][i] *= corr;
    m[r] = m_new;
  }
#pragma unroll
  for (int j = 0; j < kLoads; ++j) {
    float vf[kLaneDims];
    LaneDims<kFp8>(vr[j], vf);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float p = Rescale(s[r][j], m[r]);
      l[r] += p;
      const float pv = kFp8 ? p * vs[j] : p;
#pragma unroll
      for (int i = 0; i < kLaneDims; ++i) acc[r][i] += pv * vf[i];
    }
  }
}

template <int HD, int R, bool kPrefetch, bool kFp8>
__global__ void __launch_bounds__(32 * kWarps)
    DecodeKernel(const bf16* __restrict__ q, int64_t row_stride, StepTokens tokens,
                 AttentionShape shape, PagedKv kv, int splits, bf16* __restrict__ out,
                 float* __restrict__ partial) {
  constexpr int kGroupLanes = HD / kLaneDims;       // lanes sharing a key: 8 or 16
  constexpr int kKeysPerLoad = 32 / kGroupLanes;    // 4 or 2
  constexpr int kLoads = kWarpKeys / kKeysPerLoad;  // 2 or 4
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int sub = lane % kGroupLanes, group = lane / kGroupLanes;
  const int64_t t = blockIdx.x;
  const int split = blockIdx.z;
  const int head0 = blockIdx.y * R;
  const int32_t g = head0 / (shape.q_heads / shape.kv_heads);
  const int32_t seq = tokens.token_seq[t], pos = tokens.token_pos[t];
  const SplitRange range = SplitKeys(pos, shape.window, splits);
  if (split >= range.busy) return;  // the whole block: MergeKernel reads only busy splits
  const int32_t k_begin = range.first + split * range.chunk;
  const int32_t k_end = min(pos + 1, k_begin + range.chunk);

  float qv[R][kLaneDims], acc[R][kLaneDims], m[R], l[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const bf16* qp = q + t * row_stride + static_cast<int64_t>(head0 + r) * HD + sub * kLaneDims;
#pragma unroll
    for (int i = 0; i < kLaneDims; ++i) {
      qv[r][i] = ToF(qp[i]) * shape.scale;
      acc[r][i] = 0.0f;
    }
    m[r] = -INFINITY;
    l[r] = 0.0f;
  }

  constexpr int32_t kStride = kWarps * kWarpKeys;
  constexpr int V = kVec<kFp8>;
  uint4 kr[kLoads][V], vr[kLoads][V];
  float ks[kLoads], vs[kLoads];
  int32_t k0 = k_begin + warp * kWarpKeys;
  if (kPrefetch && k0 < k_end)
    LoadRound<HD, kLoads, kFp8>(kv, seq, g, k0, k_end, group, sub, kr, vr, ks, vs);
  for (; k0 < k_end; k0 += kStride) {
    if constexpr (kPrefetch) {
      uint4 kn[kLoads][V], vn[kLoads][V];
      float kns[kLoads], vns[kLoads];
      if (k0 + kStride < k_end)
        LoadRound<HD, kLoads, kFp8>(kv, seq, g, k0 + kStride, k_end, group, sub, kn, vn, kns, vns);
      Round<HD, R, kLoads, kFp8>(shape, k0, k_end, group, qv, kr, vr, ks, vs, m, l, acc);
#pragma unroll
      for (int j = 0; j < kLoads; ++j) {
#pragma unroll
        for (int h = 0; h < V; ++h) {
          kr[j][h] = kn[j][h];
          vr[j][h] = vn[j][h];
        }
        ks[j] = kns[j];
        vs[j] = vns[j];
      }
    } else {
      LoadRound<HD, kLoads, kFp8>(kv, seq, g, k0, k_end, group, sub, kr, vr, ks, vs);
      Round<HD, R, kLoads, kFp8>(shape, k0, k_end, group, qv, kr, vr, ks, vs, m, l, acc);
    }
  }

  // Merge the lane groups of the warp (same dims, different keys).
#pragma unroll
  for (int o = kGroupLanes; o < 32; o <<= 1) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float mo = __shfl_xor_sync(0xffffffffu, m[r], o);
      const float lo = __shfl_xor_sync(0xffffffffu, l[r], o);
      const float big = fmaxf(m[r], mo);
      const float a = Rescale(m[r], big), b = Rescale(mo, big);
      l[r] = l[r] * a + lo * b;
#pragma unroll
      for (int i = 0; i < kLaneDims; ++i) {
        const float ao = __shfl_xor_sync(0xffffffffu, acc[r][i], o);
        acc[r][i] = acc[r][i] * a + ao * b;
      }
      m[r] = big;
    }
  }

  // Merge the warps.
  __shared__ float sm[kWarps][R], sl[kWarps][R], sacc[kWarps][R][HD];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (lane == 0) {
      sm[warp][r] = m[r];
      sl[warp][r] = l[r];
    }
    if (group == 0) {
#pragma unroll
      for (int i = 0; i < kLaneDims; ++i) sacc[warp][r][sub * kLaneDims + i] = acc[r][i];
    }
  }
  __syncthreads();
  const int64_t heads = shape.q_heads;
  for (int idx = threadIdx.x; idx < R * HD; idx += blockDim.x) {
    const int r = idx / HD, d = idx % HD;
    float big = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) big = fmaxf(big, sm[w][r]);
    float total = 0.0f, a = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float weight = Rescale(sm[w][r], big);
      total += sl[w][r] * weight;
      a += sacc[w][r][d] * weight;
    }
    const int64_t head = head0 + r;
    if (splits == 1) {
      out[(t * heads + head) * HD + d] = ToB(a / total);
    } else {
      float* p = partial + ((t * heads + head) * splits + split) * (HD + 2);
      p[2 + d] = a;
      if (d == 0) {
        p[0] = big;
        p[1] = total;
      }
    }
  }
}

template <int HD>
__global__ void MergeKernel(const float* __restrict__ partial, StepTokens tokens, int32_t window,
                            int splits, int64_t heads, bf16* __restrict__ out) {
  const int64_t t = blockIdx.x, head = blockIdx.y;
  const int busy = SplitKeys(tokens.token_pos[t], window, splits).busy;
  const float* p = partial + (t * heads + head) * splits * (HD + 2);
  float big = -INFINITY;
  for (int s = 0; s < busy; ++s) big = fmaxf(big, p[s * (HD + 2)]);
  float total = 0.0f;
  for (int s = 0; s < busy; ++s) total += p[s * (HD + 2) + 1] * Rescale(p[s * (HD + 2)], big);
  for (int d = threadIdx.x; d < HD; d += blockDim.x) {
    float a = 0.0f;
    for (int s = 0; s < busy; ++s) a += p[s * (HD + 2) + 2 + d] * Rescale(p[s * (HD + 2)], big);
    out[(t * heads + head) * HD + d] = ToB(a / total);
  }
}

// Query heads per block: the most of 4, 2, 1 that share one kv head (8 would spill registers).
int HeadsPerBlock(const AttentionShape& shape) {
  const int ratio = shape.q_heads / shape.kv_heads;
  for (int r : {4, 2}) {
    if (ratio % r == 0) return r;
  }
  return 1;
}

template <int HD, int R>
cudaError_t Launch(const bf16* q, int64_t row_stride, const StepTokens& tokens,
                   const AttentionShape& shape, const PagedKv& kv, int splits, float* partial,
                   bf16* out, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(tokens.count), static_cast<unsigned>(shape.q_heads / R),
                  static_cast<unsigned>(splits));
  const int sms = DeviceSmCount();
  const int64_t blocks = static_cast<int64_t>(grid.x) * grid.y * grid.z;
  auto launch = [&](auto prefetch) {
    if (kv.k8) {
      DecodeKernel<HD, R, decltype(prefetch)::value, true><<<grid, 32 * kWarps, 0, stream>>>(
          q, row_stride, tokens, shape, kv, splits, out, partial);
    } else {
      DecodeKernel<HD, R, decltype(prefetch)::value, false><<<grid, 32 * kWarps, 0, stream>>>(
          q, row_stride, tokens, shape, kv, splits, out, partial);
    }
  };
  if constexpr (HD * R <= 512) {
    if (blocks <= int64_t{kPrefetchWaveBlocksPerSm} * sms) {
      launch(std::true_type{});
    } else {
      launch(std::false_type{});
    }
  } else {
    launch(std::false_type{});
  }
  if (splits > 1) {
    const dim3 mgrid(static_cast<unsigned>(tokens.count), static_cast<unsigned>(shape.q_heads));
    MergeKernel<HD>
        <<<mgrid, HD, 0, stream>>>(partial, tokens, shape.window, splits, shape.q_heads, out);
  }
  return cudaGetLastError();
}

template <int HD>
cudaError_t LaunchHeads(const bf16* q, int64_t row_stride, const StepTokens& tokens,
                        const AttentionShape& shape, const PagedKv& kv, int splits, float* partial,
                        bf16* out, cudaStream_t stream) {
  switch (HeadsPerBlock(shape)) {
    case 4:
      return Launch<HD, 4>(q, row_stride, tokens, shape, kv, splits, partial, out, stream);
    case 2:
      return Launch<HD, 2>(q, row_stride, tokens, shape, kv, splits, partial, out, stream);
    default:
      return Launch<HD, 1>(q, row_stride, tokens, shape, kv, splits, partial, out, stream);
  }
}

bool ValidShape(const AttentionShape& shape) {
  return shape.kv_heads > 0 && shape.q_heads % shape.kv_heads == 0;
}

}  // namespace

int AttentionContextBucket(int64_t max_context) {
  return static_cast<int>(
      std::min<int64_t>((max_context + kMinSplitKeys - 1) / kMinSplitKeys, kMaxAttentionSplits));
}

int AttentionSplits(int64_t tokens, const AttentionShape& shape, int64_t max_context) {
  // Enough blocks to fill the GPU when few (token, kv head) pairs exist (decode); none when many;
  // no more than the longest visible range fills at kMinSplitKeys keys each.
  const int64_t blocks = tokens * (ValidShape(shape) ? shape.q_heads / HeadsPerBlock(shape) : 1);
  int64_t busy = AttentionContextBucket(max_context);
  if (shape.window > 0) busy = std::min<int64_t>(busy, AttentionContextBucket(shape.window));
  return static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>(busy, 4096 / std::max<int64_t>(1, blocks))));
}

size_t AttentionPartialBytes(int64_t tokens, const AttentionShape& shape, int64_t max_context) {
  const int splits = AttentionSplits(tokens, shape, max_context);
  return splits == 1
             ? 0
             : static_cast<size_t>(tokens * shape.q_heads * splits * (shape.head_dim + 2)) * 4;
}

cudaError_t PagedAttention(const bf16* q, int64_t row_stride, const StepTokens& tokens,
                           int64_t max_context, const AttentionShape& shape, const PagedKv& kv,
                           float* partial, bf16* out, cudaStream_t stream) {
  if (tokens.count == 0) return cudaSuccess;
  if (!ValidShape(shape)) return cudaErrorInvalidValue;
  const int splits = AttentionSplits(tokens.count, shape, max_context);
  switch (shape.head_dim) {  // the one place a runtime head_dim becomes a compile-time constant
    case 128:
      return LaunchHeads<128>(q, row_stride, tokens, shape, kv, splits, partial, out, stream);
    case 256:
      return LaunchHeads<256>(q, row_stride, tokens, shape, kv, splits, partial, out, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace gemma2::kernels
