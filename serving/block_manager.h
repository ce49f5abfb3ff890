// The scheduler's KV-cache budget in the executor's blocks (model/kv_blocks.h): a sequence of
// `tokens` positions is charged KvLayout::BudgetFor(tokens, step_tokens), the most its block
// tables can hold (full-attention layers: every block; sliding-window layers: about the window),
// so a plan within the budget never runs out of blocks. When none are free the scheduler preempts
// (and later recomputes) a sequence.
#pragma once

#include <cstdint>

#include "model/kv_blocks.h"

namespace gemma2::serving {

class BlockManager {
 public:
  BlockManager(int64_t total_blocks, const KvLayout& layout, int64_t step_tokens)
      : total_(total_blocks), free_(total_blocks), layout_(layout), step_tokens_(step_tokens) {}
  int64_t block_size() const { return layout_.block_size; }
  int64_t total() const { return total_; }
  int64_t free() const { return free_; }
  int64_t used() const { return total_ - free_; }
  int64_t BlocksFor(int64_t tokens) const { return layout_.BudgetFor(tokens, step_tokens_); }
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
  int64_t total_, free_;
  KvLayout layout_;
  int64_t step_tokens_;
};

}  // namespace gemma2::serving
