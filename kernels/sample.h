// Sampling on the device so only token ids leave it. Twin of SampleRow (model/sampling.h), the
// specification: greedy = first maximum; otherwise v = x / temperature, keep v >= tau (tau the
// largest value leaving at least top_k tokens and at least top_p of the softmax mass, ties kept),
// then the kept token maximizing v + GumbelNoise(seed, counter, token).
#pragma once

#include <cstddef>

#include "kernels/types.h"

namespace gemma2::kernels {

// One row's request as the kernel reads it (staged to the device each step).
struct DeviceSampling {
  int32_t greedy = 1;
  float temperature = 1.0f;
  float top_p = 1.0f;
  int32_t unused = 0;
  int64_t top_k = 0;
  uint64_t seed = 0;
  uint64_t counter = 0;
};

// fp64 scratch SampleRows needs for `rows` x `cols` logits.
size_t SampleScratchBytes(int64_t rows, int64_t cols);

cudaError_t SampleRows(const float* logits, int64_t rows, int64_t cols, const DeviceSampling* params,
                       void* scratch, int32_t* ids, cudaStream_t stream);

}  // namespace gemma2::kernels
