// The paged KV cache's block tables. One owner (the in-process Engine, or the cluster's
// coordinator) assigns physical blocks to sequences; every rank applies the same assignments
// (StepPlan::kv_assign) to its own copy of the tables, checking each, and its backend keeps
// position p of a layer of group g in slot p % block_size of block table(g)[p / block_size].
//
// Layers fall into two groups, each with its own table per sequence: full-attention layers keep
// every position; sliding-window layers only need the keys a later query can see (q - window < k),
// so blocks wholly below the window of a sequence's next position are given back and reused, and
// a long sequence holds about `window` positions of them. A physical block stores block_size
// positions of one group's layers (on each rank, its own layers), so one free list serves both.
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <span>
#include <utility>
#include <vector>

#include "common/status.h"
#include "model/config.h"

namespace gemma2 {

struct StepPlan;

enum class KvGroup : uint8_t { kFull = 0, kSliding = 1 };
inline constexpr int kKvGroups = 2;

struct KvLayout {
  int64_t block_size = 16;
  int64_t window = 0;      // the sliding-window layers' window (0: the model has none)
  int64_t max_blocks = 0;  // logical blocks per sequence: ceil(max_positions / block_size)
  std::array<bool, kKvGroups> present{};  // which groups the model's layers use

  static KvLayout For(const ModelConfig& c, int64_t block_size);
  static KvGroup GroupOf(const ModelConfig& c, int64_t layer) {
    return c.layer_is_sliding[static_cast<size_t>(layer)] && c.sliding_window > 0
               ? KvGroup::kSliding
               : KvGroup::kFull;
  }
  // Rounded up without overflow (tokens may be as large as INT64_MAX).
  int64_t BlocksOf(int64_t tokens) const {
    return tokens / block_size + (tokens % block_size != 0 ? 1 : 0);
  }
  // The logical blocks of group g a sequence holds while it computes positions
  // [start, start + n): [first, end). Full: from 0. Sliding: from the block of the first key its
  // first query sees. n = 0: what a prefix copy of `start` positions holds.
  std::pair<int64_t, int64_t> Held(KvGroup g, int64_t start, int64_t n) const;
  // The most blocks (both groups) a sequence of `tokens` positions holds when its steps take at
  // most `step_tokens` new positions: the scheduler's budget unit.
  int64_t BudgetFor(int64_t tokens, int64_t step_tokens) const;
};

// Where each of a rank's layers keeps its cache inside a pool block: its group, and its index
// among that group's layers there; a block holds `slots` layers (the larger group's count).
struct KvLayerSlots {
  std::vector<KvGroup> group;
  std::vector<int64_t> slot;
  int64_t slots = 1;
  KvLayerSlots() = default;
  explicit KvLayerSlots(std::span<const KvGroup> layer_groups);
};

// One assignment: logical block `logical` of sequence `sequence_id`'s table for `group` becomes
// physical block `physical`, or is given back when `physical` is -1.
struct KvAssign {
  int64_t sequence_id = 0;
  uint8_t group = 0;
  int32_t logical = 0;
  int32_t physical = -1;
};

class KvBlockTables {
 public:
  KvBlockTables(KvLayout layout, int64_t num_blocks);
  const KvLayout& layout() const { return layout_; }
  int64_t num_blocks() const { return static_cast<int64_t>(owner_.size()); }
  int64_t free_blocks() const { return free_count_; }

  // The owner: assigns the blocks `plan` (already through ValidateStep, so each sequence's
  // start_pos is its cached length) needs — copies into empty sequences, then each sequence's
  // new positions; sliding blocks out of every later query's window given back first — applies
  // them here and appends them to *assigns for the ranks. All or nothing: kUnavailable ("KV cache
  // full") when too few blocks are free.
  Status Plan(const StepPlan& plan, std::vector<KvAssign>* assigns);
  // The shortest prefix of sequence `id` a KvCopy may take: its sliding window is still held.
  int64_t CopyFloor(int64_t id) const;

  // Every rank: applies assignments in order, refusing (nothing after the bad one applied) a
  // block out of range or held by another sequence, a logical block out of range or already
  // mapped, a give-back of an unmapped block.
  Status Apply(std::span<const KvAssign> assigns);
  // Gives back every block of `id` (unknown ids are ignored).
  void Release(int64_t id);
  // Sequence `id`'s table for group g (logical -> physical, -1 unmapped); empty when unknown.
  std::span<const int32_t> table(int64_t id, KvGroup g) const;
  // The physical blocks a prefix copy of `tokens` positions reads from `src` and writes to `dst`
  // (both groups): an error when `src` no longer holds them.
  Status CopyPairs(int64_t src, int64_t dst, int64_t tokens, std::vector<int32_t>* from,
                   std::vector<int32_t>* to) const;

 private:
  using Tables = std::array<std::vector<int32_t>, kKvGroups>;
  KvLayout layout_;
  std::map<int64_t, Tables> seqs_;
  std::vector<int64_t> owner_;  // the sequence holding each block; -1: free
  int64_t free_count_ = 0;      // blocks with no owner
  // Blocks to take next (the owner's stack, last first). May hold blocks a rank's Apply has
  // assigned since (skipped when popped); in_stack_ keeps each block in it at most once.
  std::vector<int32_t> free_;
  std::vector<uint8_t> in_stack_;
  void Free(int32_t block);
};

}  // namespace gemma2
