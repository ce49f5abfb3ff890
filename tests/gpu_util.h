// GPU tests skip with one line where no CUDA device is present.
#pragma once

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#define GEMMA2_REQUIRE_GPU()                                                         \
  do {                                                                               \
    int _n = 0;                                                                      \
    if (cudaGetDeviceCount(&_n) != cudaSuccess || _n == 0) {                         \
      GTEST_SKIP() << "skipped: no CUDA device (run on the GPU host: ctest -L gpu)"; \
    }                                                                                \
  } while (0)
