// Prompt prefixes kept after their sequences finish, found again through hashes of whole KV
// blocks (a hash chain: block i's hash covers every token before it). A new sequence that starts
// with a cached prefix gets those positions copied (StepPlan::kv_copies) instead of recomputed.
//
// Every layer's KV is copied, sliding-window layers included: a reused prefix is exactly what a
// recomputation would have produced, whatever the window. Sliding-window layers give back blocks
// below the window (model/kv_blocks.h), so an entry serves only prefixes long enough that their
// window is still held (its min_tokens, StepExecutor::KvCopyFloor).
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <unordered_map>
#include <vector>

namespace gemma2::serving {

class PrefixCache {
 public:
  struct Entry {
    int64_t engine_id = -1;       // the executor sequence that holds the KV
    std::vector<int32_t> tokens;  // the positions it holds
    int64_t blocks = 0;           // KV blocks it holds (BlockManager's unit)
    int64_t min_tokens = 0;       // shorter prefixes are not copyable from it
    uint64_t last_use = 0;
    int pins = 0;  // copies from it planned but not yet run: not evictable
  };
  struct Match {
    int64_t entry = -1;
    int64_t tokens = 0;
  };

  PrefixCache(int64_t block_size, size_t max_entries)
      : block_size_(block_size), max_entries_(max_entries) {}
  bool enabled() const { return max_entries_ > 0; }
  bool full() const { return entries_.size() >= max_entries_; }
  // The longest cached prefix of `tokens` in whole blocks, at most `limit` tokens, that its
  // entry can give (at least the entry's min_tokens).
  Match Find(const std::vector<int32_t>& tokens, int64_t limit);
  // Keeps a finished sequence's KV; false (nothing kept) when it adds no new whole block or the
  // cache is full (EvictOne first). The caller then releases it.
  bool Add(int64_t engine_id, std::vector<int32_t> tokens, int64_t blocks, int64_t min_tokens);
  const Entry& entry(int64_t id) const { return entries_.at(id); }
  void Pin(int64_t id) { ++entries_.at(id).pins; }
  void Unpin(int64_t id) {
    if (auto it = entries_.find(id); it != entries_.end() && it->second.pins > 0) --it->second.pins;
  }
  // Removes the least recently used unpinned entry and returns it (to be released).
  std::optional<Entry> EvictOne();
  int64_t blocks() const { return blocks_; }
  size_t size() const { return entries_.size(); }

 private:
  uint64_t ChainHash(uint64_t prev, const int32_t* tokens) const;

  int64_t block_size_;
  size_t max_entries_;
  std::map<int64_t, Entry> entries_;
  std::unordered_map<uint64_t, std::pair<int64_t, int64_t>> by_hash_;  // -> (entry, whole blocks)
  int64_t next_id_ = 0, blocks_ = 0;
  uint64_t clock_ = 0;
};

}  // namespace gemma2::serving
