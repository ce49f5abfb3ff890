#include "kernels/attention.h"

#include "kernels/device.cuh"

namespace gemma2::kernels {
namespace {

constexpr int kWarpsPerBlock = 4;

// One warp per (token, q head); lane l owns dims [l*E, l*E + E). Keys are visited in order with
// an online softmax, all in fp32.
template <int kHeadDim>
__global__ void AttentionKernel(const bf16* q, int64_t row_stride, StepTokens tokens,
                                AttentionShape shape, PagedKv kv, bf16* out) {
  constexpr int E = kHeadDim / 32;
  const int lane = threadIdx.x & 31;
  const int head = blockIdx.y * kWarpsPerBlock + (threadIdx.x >> 5);
  if (head >= shape.q_heads) return;
  const int64_t t = blockIdx.x;
  const int32_t seq = tokens.token_seq[t], pos = tokens.token_pos[t];
  const int32_t first = shape.window > 0 ? max(0, pos - shape.window + 1) : 0;
  const int32_t g = head / (shape.q_heads / shape.kv_heads);

  float qv[E], acc[E];
  const bf16* qp = q + t * row_stride + head * kHeadDim + lane * E;
#pragma unroll
  for (int e = 0; e < E; ++e) {
    qv[e] = ToF(qp[e]);
    acc[e] = 0.0f;
  }
  float m = -INFINITY, l = 0.0f;
  for (int32_t k = first; k <= pos; ++k) {
    const int64_t off = KvOffset(kv, seq, k, g, kHeadDim) + lane * E;
    float dot = 0.0f;
#pragma unroll
    for (int e = 0; e < E; ++e) dot += qv[e] * ToF(kv.k[off + e]);
    float s = WarpSum(dot) * shape.scale;
    if (shape.softcap > 0) s = tanhf(s / shape.softcap) * shape.softcap;
    const float m_new = fmaxf(m, s);
    const float corr = __expf(m - m_new), p = __expf(s - m_new);
    l = l * corr + p;
#pragma unroll
    for (int e = 0; e < E; ++e) acc[e] = acc[e] * corr + p * ToF(kv.v[off + e]);
    m = m_new;
  }
  bf16* o = out + t * (static_cast<int64_t>(shape.q_heads) * kHeadDim) + head * kHeadDim + lane * E;
  const float inv = 1.0f / l;
#pragma unroll
  for (int e = 0; e < E; ++e) o[e] = ToB(acc[e] * inv);
}

template <int kHeadDim>
cudaError_t Launch(const bf16* q, int64_t row_stride, const StepTokens& tokens,
                   const AttentionShape& shape, const PagedKv& kv, bf16* out, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(tokens.count), CeilDiv(shape.q_heads, kWarpsPerBlock));
  AttentionKernel<kHeadDim><<<grid, 32 * kWarpsPerBlock, 0, stream>>>(q, row_stride, tokens, shape,
                                                                       kv, out);
  return cudaGetLastError();
}

}  // namespace

cudaError_t PagedAttention(const bf16* q, int64_t row_stride, const StepTokens& tokens,
                           const AttentionShape& shape, const PagedKv& kv, bf16* out,
                           cudaStream_t stream) {
  if (tokens.count == 0) return cudaSuccess;
  if (shape.kv_heads <= 0 || shape.q_heads % shape.kv_heads != 0) return cudaErrorInvalidValue;
  switch (shape.head_dim) {  // the one place a runtime head_dim becomes a compile-time constant
    case 128: return Launch<128>(q, row_stride, tokens, shape, kv, out, stream);
    case 256: return Launch<256>(q, row_stride, tokens, shape, kv, out, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace gemma2::kernels
