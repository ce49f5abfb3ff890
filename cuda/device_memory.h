// Device and pinned host memory owned by shared pointers: freed with the last Tensor (or owner)
// that holds them, failures reported with the size asked for.
#pragma once

#include <cstddef>
#include <memory>

#include "common/status.h"

namespace gemma2 {

// At least `bytes` of device memory on the current device (256 at least), contents undefined.
Result<std::shared_ptr<void>> DeviceAlloc(size_t bytes);

// `bytes` of page-locked host memory (cudaHostAlloc), contents undefined.
Result<std::shared_ptr<void>> PinnedAlloc(size_t bytes);

}  // namespace gemma2
