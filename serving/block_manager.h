// The coordinator's KV-cache budget in fixed-size blocks of token positions, the unit the CUDA
// backend's paged pool allocates in. A sequence holds ceil(cached tokens / block_size) blocks;
// when none are free the scheduler preempts (and later recomputes) a sequence.
#pragma once

#include <cstdint>

namespace gemma2::serving {

class BlockManager {
 public:
  BlockManager(int64_t total_blocks, int64_t block_size)
      : total_(total_blocks), free_(total_blocks), block_size_(block_size) {}
  int64_t block_size() const { return block_size_; }
  int64_t total() const { return total_; }
  int64_t free() const { return free_; }
  int64_t used() const { return total_ - free_; }
  int64_t BlocksFor(int64_t tokens) const { return (tokens + block_size_ - 1) / block_size_; }
  // Grows a holding of `held` blocks to cover `tokens`; false (nothing taken) when short.
  bool Grow(int64_t& held, int64_t tokens) {
    const int64_t need = BlocksFor(tokens) - held;
    if (need <= 0) return true;
    if (need > free_) return false;
    free_ -= need;
    held += need;
    return true;
  }
  void Release(int64_t& held) {
    free_ += held;
    held = 0;
  }

 private:
  int64_t total_, free_, block_size_;
};

}  // namespace gemma2::serving
