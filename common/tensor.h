// A 2-D row-major tensor living in a backend's memory (host for cpu, device for cuda).
#pragma once

#include <cstdint>
#include <memory>

#include "common/dtype.h"

namespace gemma2 {

struct Tensor {
  std::shared_ptr<void> storage;  // keeps the memory alive; the backend's deleter frees it
  void* data = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  DType dtype = DType::kF32;
  // kF8E4M3 weights: one fp32 dequantization scale per row (value = stored * row_scales[row]),
  // in the same memory as data; null otherwise.
  std::shared_ptr<void> scale_storage;
  float* row_scales = nullptr;

  bool empty() const { return data == nullptr; }
  int64_t numel() const { return rows * cols; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(data);
  }
};

}  // namespace gemma2
