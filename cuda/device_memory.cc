#include "cuda/device_memory.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <string>

#include "common/cuda_check.h"

namespace gemma2 {

Result<std::shared_ptr<void>> DeviceAlloc(size_t bytes) {
  void* p = nullptr;
  const cudaError_t e = cudaMalloc(&p, std::max<size_t>(bytes, 256));
  if (e != cudaSuccess) {
    return cuda_detail::Check(e, "cudaMalloc", __FILE__, __LINE__)
        .WithContext("allocating " + std::to_string(bytes >> 20) + " MiB of device memory");
  }
  return std::shared_ptr<void>(p, [](void* q) { cudaFree(q); });
}

Result<std::shared_ptr<void>> PinnedAlloc(size_t bytes) {
  void* p = nullptr;
  const cudaError_t e = cudaHostAlloc(&p, std::max<size_t>(bytes, 256), cudaHostAllocDefault);
  if (e != cudaSuccess) {
    return cuda_detail::Check(e, "cudaHostAlloc", __FILE__, __LINE__)
        .WithContext("allocating " + std::to_string(bytes >> 20) + " MiB of pinned host memory");
  }
  return std::shared_ptr<void>(p, [](void* q) { cudaFreeHost(q); });
}

}  // namespace gemma2
