// FP8 E4M3 projections (model/quantization.h): per-row quantization of bf16 matrices (weights at
// load, activations per token before an FP8 GEMM), and the decode-time products with FP8
// weights, dequantized in registers (GemvFp8 up to 8 tokens, SkinnyFp8 up to 16). Twins of
// QuantizeRowsFp8 and CpuBackend::Linear on dequantized weights.
#pragma once

#include "kernels/types.h"

namespace gemma2::kernels {

using fp8 = uint8_t;  // E4M3 bits (__nv_fp8_e4m3's storage)

// q[r][k] = E4M3(x[r][k] / scale[r]) with scale[r] = max_k |x[r][k]| / 448 (1 for a zero row),
// saturating, rounded to nearest even: bit for bit QuantizeRowsFp8 on the same values.
cudaError_t QuantizeRowsFp8(const bf16* x, int64_t rows, int64_t cols, fp8* q, float* scale,
                            cudaStream_t stream);

// out[t][n] = in[t][n] * row_scale[t] * col_scale[n] (fp32 in; bf16 or fp32 out, may alias in
// when fp32): the scales of an FP8 product computed unscaled.
cudaError_t ScaleRowsAndColumns(const float* in, const float* row_scale, const float* col_scale,
                                void* out, bool out_f32, int64_t rows, int64_t cols,
                                cudaStream_t stream);

inline constexpr int64_t kGemvFp8MaxTokens = 8;

// True when GemvFp8 can run this shape: 1 <= tokens <= kGemvFp8MaxTokens, k % 16 == 0, x and w
// 16-byte aligned.
bool GemvFp8Supports(const void* x, const void* w, int64_t tokens, int64_t k);

// out[t][n] = scale[n] * sum_k x[t][k] * w[n][k]: bf16 x, E4M3 w, fp32 accumulation, bf16 or
// fp32 out. Memory-bound like Gemv, on half the weight bytes.
cudaError_t GemvFp8(const bf16* x, const fp8* w, const float* scale, void* out, bool out_f32,
                    int64_t tokens, int64_t n, int64_t k, cudaStream_t stream);

inline constexpr int64_t kSkinnyFp8MaxTokens = 16;
// Row groups (32 weight rows each) a split product can count arrivals for.
inline constexpr int64_t kSkinnyFp8MaxSplitGroups = 1024;

// True when SkinnyFp8 can run this shape: 1 <= tokens <= kSkinnyFp8MaxTokens, n % 32 == 0,
// k % 64 == 0, x and w 16-byte aligned.
bool SkinnyFp8Supports(const void* x, const void* w, int64_t tokens, int64_t n, int64_t k);

// How many K ranges SkinnyFp8 should split an n x k weight into (enough blocks for this GPU).
int SkinnyFp8Splits(int64_t n, int64_t k);

// GemvFp8's product for more tokens (the decode steps of 9..16 sequences): the same arithmetic on
// the bf16 tensor cores, weights dequantized in registers (exact), fp32 accumulation. With
// splits > 1: `partial` holds splits x tokens x n floats, `arrivals` n / 32 counters that start at
// 0 (and are left at 0).
cudaError_t SkinnyFp8(const bf16* x, const fp8* w, const float* scale, void* out, bool out_f32,
                      int64_t tokens, int64_t n, int64_t k, int splits, float* partial,
                      unsigned* arrivals, cudaStream_t stream);

}  // namespace gemma2::kernels
