#include "kernels/prefill_attention.h"

#include "common/cuda_check.h"
#include "kernels/device.cuh"

namespace gemma2::kernels {
namespace {

// Row i of head h: p[j] = softmax_j(softcap(s[j] * scale)) over visible keys j (i - window < j
// <= i), 0 elsewhere. S rows are keys-contiguous ([head][query][key]).
__global__ void MaskedSoftmaxKernel(const float* __restrict__ scores, bf16* __restrict__ probs,
                                    int64_t tokens, float scale, float softcap, int64_t window) {
  const int64_t i = blockIdx.x, h = blockIdx.y;
  const float* s = scores + (h * tokens + i) * tokens;
  bf16* p = probs + (h * tokens + i) * tokens;
  const int64_t lo = window > 0 ? max(int64_t{0}, i - window + 1) : 0;
  auto value = [&](int64_t j) {
    float v = s[j] * scale;
    if (softcap > 0) v = tanhf(v / softcap) * softcap;
    return v;
  };
  float m = -INFINITY;
  for (int64_t j = lo + threadIdx.x; j <= i; j += blockDim.x) m = fmaxf(m, value(j));
  // Block max through shared memory.
  __shared__ float red[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  if (lane == 0) red[warp] = m;
  __syncthreads();
  m = lane < (blockDim.x >> 5) ? red[lane] : -INFINITY;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  float sum = 0.0f;
  for (int64_t j = lo + threadIdx.x; j <= i; j += blockDim.x) sum += __expf(value(j) - m);
  sum = BlockSum(sum);
  const float inv = 1.0f / sum;
  for (int64_t j = threadIdx.x; j < tokens; j += blockDim.x) {
    p[j] = (j >= lo && j <= i) ? ToB(__expf(value(j) - m) * inv) : ToB(0.0f);
  }
}

}  // namespace

size_t PrefillAttentionWorkspace(const PrefillAttentionShape& s, int64_t kv_chunk) {
  const int64_t group = s.q_heads / s.kv_heads;
  return static_cast<size_t>(kv_chunk * group * s.tokens * s.tokens) * (sizeof(float) + sizeof(bf16));
}

int64_t PrefillAttentionKvChunk(const PrefillAttentionShape& s, size_t budget) {
  const size_t per = PrefillAttentionWorkspace(s, 1);
  return std::max<int64_t>(1, std::min<int64_t>(s.kv_heads, static_cast<int64_t>(budget / per)));
}

Status PrefillAttention(Gemm& gemm, const bf16* qkv, const PrefillAttentionShape& s, void* workspace,
                        int64_t kv_chunk, bf16* out, cudaStream_t stream) {
  const int64_t t = s.tokens, hd = s.head_dim, group = s.q_heads / s.kv_heads;
  const bf16* q = qkv;
  const bf16* k = qkv + s.q_heads * hd;
  const bf16* v = k + s.kv_heads * hd;
  for (int64_t g0 = 0; g0 < s.kv_heads; g0 += kv_chunk) {
    const int64_t gc = std::min(kv_chunk, s.kv_heads - g0);
    // Workspace: scores [member j][kv head][T][T] fp32, then probs in the same order, bf16.
    auto* scores = static_cast<float*>(workspace);
    auto* probs = reinterpret_cast<bf16*>(scores + gc * group * t * t);
    for (int64_t j = 0; j < group; ++j) {
      // S^T (keys x queries, column-major) = K_g (keys x hd) · Q_h^T: row-major S[query][key].
      MatmulSpec sk;
      sk.trans_a = true;
      sk.m = t;
      sk.n = t;
      sk.k = hd;
      sk.a = k + g0 * hd;
      sk.lda = s.row_stride;
      sk.stride_a = hd;
      sk.b = q + (g0 * group + j) * hd;
      sk.ldb = s.row_stride;
      sk.stride_b = group * hd;
      sk.c = scores + j * gc * t * t;
      sk.ldc = t;
      sk.stride_c = t * t;
      sk.c_f32 = true;
      sk.batch = gc;
      RETURN_IF_ERROR(gemm.Matmul(sk));
    }
    MaskedSoftmaxKernel<<<dim3(static_cast<unsigned>(t), static_cast<unsigned>(gc * group)), 256, 0, stream>>>(
        scores, probs, t, s.scale, s.softcap, s.window);
    RETURN_IF_CUDA_ERROR(cudaGetLastError());
    for (int64_t j = 0; j < group; ++j) {
      // O_h^T (hd x queries) = V_g^T (hd x keys) · P_h^T (keys x queries).
      MatmulSpec sv;
      sv.trans_a = false;
      sv.m = hd;
      sv.n = t;
      sv.k = t;
      sv.a = v + g0 * hd;
      sv.lda = s.row_stride;
      sv.stride_a = hd;
      sv.b = probs + j * gc * t * t;
      sv.ldb = t;
      sv.stride_b = t * t;
      sv.c = out + (g0 * group + j) * hd;
      sv.ldc = s.q_heads * hd;
      sv.stride_c = group * hd;
      sv.c_f32 = false;
      sv.batch = gc;
      RETURN_IF_ERROR(gemm.Matmul(sv));
    }
  }
  return OkStatus();
}

}  // namespace gemma2::kernels
