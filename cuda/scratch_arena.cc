#include "cuda/scratch_arena.h"

#include <algorithm>

#include "cuda/device_memory.h"

namespace gemma2 {
namespace {
size_t Rounded(size_t bytes) { return (std::max<size_t>(bytes, 1) + 255) & ~size_t{255}; }
}  // namespace

Result<void*> ScratchArena::Take(size_t bytes) {
  bytes = Rounded(bytes);
  while (chunk_ < chunks_.size() && offset_ + bytes > chunk_bytes_[chunk_]) {
    ++chunk_;
    offset_ = 0;
  }
  if (chunk_ == chunks_.size()) {
    const size_t size = std::max(bytes, kChunkBytes);
    Result<std::shared_ptr<void>> chunk = DeviceAlloc(size);
    if (!chunk.ok()) return chunk.status().WithContext("step scratch");
    chunks_.push_back(std::move(*chunk));
    chunk_bytes_.push_back(size);
    offset_ = 0;
  }
  void* p = static_cast<char*>(chunks_[chunk_].get()) + offset_;
  offset_ += bytes;
  return Result<void*>(p);
}

Result<PinnedStaging> PinnedStaging::Create(size_t bytes) {
  PinnedStaging s;
  ASSIGN_OR_RETURN(s.area_, PinnedAlloc(bytes));
  s.bytes_ = bytes;
  return s;
}

char* PinnedStaging::Take(size_t bytes) {
  if (offset_ + bytes > bytes_) return nullptr;
  char* p = static_cast<char*>(area_.get()) + offset_;
  offset_ += Rounded(bytes);
  return p;
}

}  // namespace gemma2
