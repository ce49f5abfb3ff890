// Small row-wise ops. Twins of CpuBackend's GeluTanhMul, Softcap, GatherRows, ScatterColumns, and
// the bias add of Linear.
#pragma once

#include <cstddef>

#include "kernels/types.h"

namespace gemma2::kernels {

// out[r][i] = gelu_tanh(gate_up[r][i]) * gate_up[r][n + i]  (fp32 math, one rounding).
cudaError_t GeluTanhMul(const bf16* gate_up, int64_t rows, int64_t n, bf16* out, cudaStream_t stream);
// x = tanh(x / cap) * cap over n fp32 values.
cudaError_t Softcap(float* x, int64_t n, float cap, cudaStream_t stream);
// Structured output: x[r][j] = -inf where bit (first_bit + j) of mask row_slot[r]'s words is
// clear (bit b: word b / 64, bit b % 64); rows whose slot is -1 are left alone. `masks` is
// [slots, words], fp32 x [rows, cols].
cudaError_t MaskTokens(float* x, int64_t rows, int64_t cols, const uint64_t* masks, int64_t words,
                       const int32_t* row_slot, int64_t first_bit, cudaStream_t stream);
// out[i] = x[rows[i]] for bf16 rows of `cols` elements.
cudaError_t GatherRows(const bf16* x, int64_t cols, const int64_t* rows, int64_t count, bf16* out,
                       cudaStream_t stream);
// dst[r] = 0 except dst[r][offset : offset + src_cols] = src[r]  (fp32).
cudaError_t ScatterColumns(const float* src, int64_t rows, int64_t src_cols, int64_t offset,
                           float* dst, int64_t dst_cols, cudaStream_t stream);
// out[r][j] += bias[j]  (out bf16 or fp32).
cudaError_t AddBias(void* out, bool out_is_f32, const bf16* bias, int64_t rows, int64_t cols,
                    cudaStream_t stream);
// ids[r] = first index of the maximum of row r (fp32 rows of `cols`), as torch.argmax. Two
// passes over column chunks; `scratch` holds ArgmaxScratchBytes(rows).
size_t ArgmaxScratchBytes(int64_t rows);
cudaError_t ArgmaxRows(const float* x, int64_t rows, int64_t cols, void* scratch, int32_t* ids,
                       cudaStream_t stream);
// Fills n bf16 values with a NaN pattern (tests poison scratch memory with it).
cudaError_t Poison(void* p, int64_t bytes, cudaStream_t stream);

}  // namespace gemma2::kernels
