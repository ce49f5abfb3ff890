// Embedding gather × normalizer (vocab-parallel: ids outside [vocab_begin, vocab_begin + rows)
// give zero rows). Twin of CpuBackend::Embed.
#pragma once

#include "kernels/types.h"

namespace gemma2::kernels {

cudaError_t Embed(const int32_t* ids, int64_t tokens, const bf16* table, int64_t table_rows,
                  int64_t hidden, int64_t vocab_begin, float scale, bf16* out, cudaStream_t stream);

}  // namespace gemma2::kernels
