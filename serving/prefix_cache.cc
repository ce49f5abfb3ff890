#include "serving/prefix_cache.h"

#include <algorithm>

namespace gemma2::serving {

uint64_t PrefixCache::ChainHash(uint64_t prev, const int32_t* tokens) const {
  uint64_t h = prev ^ 0xcbf29ce484222325ull;  // FNV-1a over the previous hash and the block
  for (int64_t i = 0; i < block_size_; ++i) {
    h = (h ^ static_cast<uint32_t>(tokens[i])) * 0x100000001b3ull;
    h = (h ^ (h >> 29)) * 0xbf58476d1ce4e5b9ull;
  }
  return h;
}

PrefixCache::Match PrefixCache::Find(const std::vector<int32_t>& tokens, int64_t limit) {
  Match best;
  if (!enabled()) return best;
  const int64_t whole = std::min<int64_t>(limit, static_cast<int64_t>(tokens.size())) / block_size_;
  uint64_t h = 0;
  for (int64_t b = 0; b < whole; ++b) {
    h = ChainHash(h, tokens.data() + b * block_size_);
    auto it = by_hash_.find(h);
    if (it == by_hash_.end()) break;
    const Entry& e = entries_.at(it->second.first);
    const int64_t n = (b + 1) * block_size_;
    // A hash is a claim; the tokens are the proof.
    if (!std::equal(tokens.begin(), tokens.begin() + n, e.tokens.begin())) break;
    if (n >= e.min_tokens) best = {it->second.first, n};
  }
  if (best.entry >= 0) entries_.at(best.entry).last_use = ++clock_;
  return best;
}

bool PrefixCache::Add(int64_t engine_id, std::vector<int32_t> tokens, int64_t blocks,
                      int64_t min_tokens) {
  if (!enabled()) return false;
  const int64_t whole = static_cast<int64_t>(tokens.size()) / block_size_;
  if (whole == 0 || Find(tokens, whole * block_size_).tokens == whole * block_size_) return false;
  if (full()) return false;
  const int64_t id = next_id_++;
  uint64_t h = 0;
  for (int64_t b = 0; b < whole; ++b) {
    h = ChainHash(h, tokens.data() + b * block_size_);
    by_hash_[h] = {id, b + 1};  // the newest holder of a prefix answers for it
  }
  blocks_ += blocks;
  entries_[id] = Entry{engine_id, std::move(tokens), blocks, min_tokens, ++clock_, 0};
  return true;
}

std::optional<PrefixCache::Entry> PrefixCache::EvictOne() {
  auto victim = entries_.end();
  for (auto it = entries_.begin(); it != entries_.end(); ++it) {
    if (it->second.pins == 0 &&
        (victim == entries_.end() || it->second.last_use < victim->second.last_use)) {
      victim = it;
    }
  }
  if (victim == entries_.end()) return std::nullopt;
  for (auto it = by_hash_.begin(); it != by_hash_.end();) {
    it = it->second.first == victim->first ? by_hash_.erase(it) : std::next(it);
  }
  Entry e = std::move(victim->second);
  entries_.erase(victim);
  blocks_ -= e.blocks;
  return e;
}

}  // namespace gemma2::serving
