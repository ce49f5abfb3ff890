// Weights to the device through pinned staging buffers: the host fills one buffer (reading the
// checkpoint, kFillThreads threads over disjoint rows) while the copies out of the others run, so
// reading and the PCIe copy overlap and no pageable copy (the driver's own bounce buffer) is paid.
#pragma once

#include <cuda_runtime.h>

#include <array>
#include <cstdint>
#include <memory>

#include "model/backend.h"

namespace gemma2 {

class WeightStager {
 public:
  // kBuffers buffers of `buffer_bytes` pinned host memory, and a stream of their own.
  static Result<std::unique_ptr<WeightStager>> Create(size_t buffer_bytes = size_t{64} << 20);
  ~WeightStager();  // waits for the copies in flight, then frees
  WeightStager(const WeightStager&) = delete;
  WeightStager& operator=(const WeightStager&) = delete;

  // Copies `rows` rows of `row_bytes` to `device_dst`, `fill` writing them a buffer at a time.
  // Returns when the last buffer is queued; the copies may still run (Finish waits for them).
  Status Copy(void* device_dst, int64_t rows, int64_t row_bytes, const Backend::RowFiller& fill);
  // Waits for every copy queued; the first failure of any.
  Status Finish();

 private:
  static constexpr int kBuffers = 3;
  static constexpr int kFillThreads = 4;
  // fill(r0, r1) split over kFillThreads threads; the first failure.
  static Status ParallelFill(const Backend::RowFiller& fill, int64_t r0, int64_t r1,
                             int64_t row_bytes, void* dst);
  WeightStager() = default;
  size_t buffer_bytes_ = 0;
  cudaStream_t stream_ = nullptr;
  std::array<void*, kBuffers> buffers_{};
  std::array<cudaEvent_t, kBuffers> copied_{};  // buffer i is free once copied_[i] has happened
  int next_ = 0;
};

}  // namespace gemma2
