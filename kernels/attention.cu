#include "kernels/attention.h"

#include "kernels/device.cuh"

namespace gemma2::kernels {
namespace {

constexpr int kWarps = 4;  // warps per block, each taking every kWarps-th group of keys
constexpr int kGroup = 4;  // keys a warp has in flight at once

// Block (t, head, split) covers split `split` of the keys visible to token t: ceil(visible /
// splits) keys. Each warp keeps an online softmax over its keys (lane l owns dims [l*E, l*E+E)),
// the warps merge in shared memory, and the block writes either the output (one split) or an
// unnormalized partial (max, sum, acc[HD]) for MergeKernel.
template <int HD>
__global__ void __launch_bounds__(32 * kWarps)
    SplitKernel(const bf16* __restrict__ q, int64_t row_stride, StepTokens tokens,
                AttentionShape shape, PagedKv kv, int splits, bf16* __restrict__ out,
                float* __restrict__ partial) {
  constexpr int E = HD / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t t = blockIdx.x;
  const int head = blockIdx.y, split = blockIdx.z;
  const int32_t seq = tokens.token_seq[t], pos = tokens.token_pos[t];
  const int32_t first = shape.window > 0 ? max(0, pos - shape.window + 1) : 0;
  const int32_t visible = pos - first + 1;
  const int32_t chunk = (visible + splits - 1) / splits;
  const int32_t k_begin = first + split * chunk, k_end = min(pos + 1, k_begin + chunk);
  const int32_t g = head / (shape.q_heads / shape.kv_heads);
  const bf16* __restrict__ kc = kv.k;
  const bf16* __restrict__ vc = kv.v;

  float qv[E], acc[E];
  const bf16* qp = q + t * row_stride + head * HD + lane * E;
#pragma unroll
  for (int e = 0; e < E; ++e) {
    qv[e] = ToF(qp[e]) * shape.scale;
    acc[e] = 0.0f;
  }
  float m = -INFINITY, l = 0.0f;
  for (int32_t k0 = k_begin + warp * kGroup; k0 < k_end; k0 += kWarps * kGroup) {
    int64_t off[kGroup];
    float s[kGroup];
#pragma unroll
    for (int j = 0; j < kGroup; ++j) {
      const int32_t k = min(k0 + j, k_end - 1);  // clamp: duplicates are masked below
      off[j] = KvOffset(kv, seq, k, g, HD) + lane * E;
    }
#pragma unroll
    for (int j = 0; j < kGroup; ++j) {
      float dot = 0.0f;
#pragma unroll
      for (int e = 0; e < E; ++e) dot += qv[e] * ToF(kc[off[j] + e]);
      s[j] = dot;
    }
    float m_new = m;
#pragma unroll
    for (int j = 0; j < kGroup; ++j) {
      s[j] = WarpSum(s[j]);
      if (shape.softcap > 0) s[j] = tanhf(s[j] / shape.softcap) * shape.softcap;
      if (k0 + j >= k_end) s[j] = -INFINITY;
      m_new = fmaxf(m_new, s[j]);
    }
    const float corr = __expf(m - m_new);  // m_new is finite: key k0 is always valid
    l *= corr;
#pragma unroll
    for (int e = 0; e < E; ++e) acc[e] *= corr;
#pragma unroll
    for (int j = 0; j < kGroup; ++j) {
      const float p = __expf(s[j] - m_new);
      l += p;
#pragma unroll
      for (int e = 0; e < E; ++e) acc[e] += p * ToF(vc[off[j] + e]);
    }
    m = m_new;
  }

  // Merge the warps.
  __shared__ float sm[kWarps], sl[kWarps], sacc[kWarps][HD];
  if (lane == 0) {
    sm[warp] = m;
    sl[warp] = l;
  }
#pragma unroll
  for (int e = 0; e < E; ++e) sacc[warp][lane * E + e] = acc[e];
  __syncthreads();
  float big = -INFINITY;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) big = fmaxf(big, sm[w]);
  float total = 0.0f;
  float weight[kWarps];
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    weight[w] = sm[w] == -INFINITY ? 0.0f : __expf(sm[w] - big);
    total += sl[w] * weight[w];
  }
  const int64_t heads = shape.q_heads;
  for (int d = threadIdx.x; d < HD; d += blockDim.x) {
    float a = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) a += sacc[w][d] * weight[w];
    if (splits == 1) {
      out[t * heads * HD + head * HD + d] = ToB(a / total);
    } else {
      float* p = partial + ((t * heads + head) * splits + split) * (HD + 2);
      p[2 + d] = a;
      if (d == 0) {
        p[0] = big;  // -inf for an empty split
        p[1] = total;
      }
    }
  }
}

template <int HD>
__global__ void MergeKernel(const float* __restrict__ partial, int splits, int64_t heads,
                            bf16* __restrict__ out) {
  const int64_t t = blockIdx.x, head = blockIdx.y;
  const float* p = partial + (t * heads + head) * splits * (HD + 2);
  float big = -INFINITY;
  for (int s = 0; s < splits; ++s) big = fmaxf(big, p[s * (HD + 2)]);
  float total = 0.0f;
  for (int s = 0; s < splits; ++s) {
    const float ms = p[s * (HD + 2)];
    if (ms != -INFINITY) total += p[s * (HD + 2) + 1] * __expf(ms - big);
  }
  for (int d = threadIdx.x; d < HD; d += blockDim.x) {
    float a = 0.0f;
    for (int s = 0; s < splits; ++s) {
      const float ms = p[s * (HD + 2)];
      if (ms != -INFINITY) a += p[s * (HD + 2) + 2 + d] * __expf(ms - big);
    }
    out[t * heads * HD + head * HD + d] = ToB(a / total);
  }
}

template <int HD>
cudaError_t Launch(const bf16* q, int64_t row_stride, const StepTokens& tokens,
                   const AttentionShape& shape, const PagedKv& kv, int splits, float* partial,
                   bf16* out, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(tokens.count), static_cast<unsigned>(shape.q_heads),
                  static_cast<unsigned>(splits));
  SplitKernel<HD><<<grid, 32 * kWarps, 0, stream>>>(q, row_stride, tokens, shape, kv, splits, out, partial);
  if (splits > 1) {
    const dim3 mgrid(static_cast<unsigned>(tokens.count), static_cast<unsigned>(shape.q_heads));
    MergeKernel<HD><<<mgrid, HD, 0, stream>>>(partial, splits, shape.q_heads, out);
  }
  return cudaGetLastError();
}

}  // namespace

int AttentionSplits(int64_t tokens, int32_t q_heads) {
  // Enough blocks to fill the GPU when few (token, head) pairs exist (decode); none when many.
  const int64_t pairs = tokens * q_heads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(kMaxAttentionSplits, 4096 / pairs)));
}

size_t AttentionPartialBytes(int64_t tokens, const AttentionShape& shape) {
  const int splits = AttentionSplits(tokens, shape.q_heads);
  return splits == 1 ? 0 : static_cast<size_t>(tokens * shape.q_heads * splits * (shape.head_dim + 2)) * 4;
}

cudaError_t PagedAttention(const bf16* q, int64_t row_stride, const StepTokens& tokens,
                           const AttentionShape& shape, const PagedKv& kv, float* partial,
                           bf16* out, cudaStream_t stream) {
  if (tokens.count == 0) return cudaSuccess;
  if (shape.kv_heads <= 0 || shape.q_heads % shape.kv_heads != 0) return cudaErrorInvalidValue;
  const int splits = AttentionSplits(tokens.count, shape.q_heads);
  switch (shape.head_dim) {  // the one place a runtime head_dim becomes a compile-time constant
    case 128: return Launch<128>(q, row_stride, tokens, shape, kv, splits, partial, out, stream);
    case 256: return Launch<256>(q, row_stride, tokens, shape, kv, splits, partial, out, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace gemma2::kernels
