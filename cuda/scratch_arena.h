// A step's memory: device scratch bumped from chunks kept across steps, and a pinned host area
// that stages the step's small inputs (token positions, block tables, ids, sampling requests).
// Both restart at every step; a steady state allocates nothing, and a step of a captured decode
// graph gets back the very addresses its graph was captured with.
#pragma once

#include <cstddef>
#include <memory>
#include <vector>

#include "common/status.h"

namespace gemma2 {

class ScratchArena {
 public:
  // The next `bytes` (rounded up to 256) of device scratch, valid until Reset.
  Result<void*> Take(size_t bytes);
  void Reset() { chunk_ = offset_ = 0; }

 private:
  static constexpr size_t kChunkBytes = size_t{256} << 20;
  std::vector<std::shared_ptr<void>> chunks_;
  std::vector<size_t> chunk_bytes_;
  size_t chunk_ = 0, offset_ = 0;
};

class PinnedStaging {
 public:
  static Result<PinnedStaging> Create(size_t bytes);
  // Room for `bytes` (rounded up to 256) in the pinned area, or null when the step's inputs do not
  // fit; valid until Reset (which the step calls only after the stream has drained).
  char* Take(size_t bytes);
  void Reset() { offset_ = 0; }

 private:
  std::shared_ptr<void> area_;
  size_t bytes_ = 0, offset_ = 0;
};

}  // namespace gemma2
