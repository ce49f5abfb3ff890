#include "structured/token_masker.h"

#include <algorithm>
#include <bit>
#include <numeric>
#include <string_view>

namespace gemma2::structured {

TokenVocabulary::TokenVocabulary(std::vector<std::string> bytes, std::vector<int32_t> stop_ids)
    : bytes_(std::move(bytes)), stop_ids_(std::move(stop_ids)) {
  sorted_.resize(bytes_.size());
  std::iota(sorted_.begin(), sorted_.end(), 0);
  std::sort(sorted_.begin(), sorted_.end(), [&](int32_t a, int32_t b) {
    return bytes_[static_cast<size_t>(a)] < bytes_[static_cast<size_t>(b)];
  });
}

size_t TokenVocabulary::RangeEnd(size_t i, size_t len) const {
  const std::string_view prefix = std::string_view(bytes(sorted_[i])).substr(0, len);
  auto it = std::partition_point(sorted_.begin() + static_cast<std::ptrdiff_t>(i), sorted_.end(),
                                 [&](int32_t id) { return bytes(id).starts_with(prefix); });
  return static_cast<size_t>(it - sorted_.begin());
}

int64_t TokenMask::Count() const {
  int64_t n = 0;
  for (uint64_t w : words) n += std::popcount(w);
  return n;
}

TokenMasker::TokenMasker(std::shared_ptr<const Grammar> grammar,
                         std::shared_ptr<const TokenVocabulary> vocab)
    : grammar_(std::move(grammar)), vocab_(std::move(vocab)) {}

void TokenMasker::Allowed(const State& state, TokenMask& mask) {
  mask.Reset(vocab_->size());
  for (const Stack& s : state) {
    if (s.empty()) {
      for (int32_t id : vocab_->stop_ids()) mask.Set(id);
      continue;
    }
    const PositionTokens& p = ForPosition(s.back());
    for (size_t w = 0; w < mask.words.size(); ++w) mask.words[w] |= p.accepted.words[w];
    const State one{s};
    for (int32_t id : p.uncertain) {
      if (!mask.Test(id) && Takes(*grammar_, one, vocab_->bytes(id))) mask.Set(id);
    }
  }
}

// The walk over the sorted vocabulary from the single-frame stack [p]. Per depth d of the
// current prefix: the live stacks after d bytes, and whether the frame had ended by then (an
// empty stack: what follows belongs to the frames below, unknown here).
const TokenMasker::PositionTokens& TokenMasker::ForPosition(int32_t p) {
  if (auto it = positions_.find(p); it != positions_.end()) return it->second;
  const Grammar& g = *grammar_;
  const TokenVocabulary& v = *vocab_;
  PositionTokens out;
  out.accepted.Reset(v.size());
  State start;
  (void)Close(g, Stack{p}, start);
  std::vector<State> live{start};
  std::vector<char> ended_at{0}, ended_by{0};  // ended exactly after d bytes; at or before d
  std::string cur;                             // the prefix `live` describes
  size_t dead = std::string::npos;             // depth where no live stack was left
  const std::vector<int32_t>& order = v.sorted();
  State next;
  for (size_t i = 0; i < order.size();) {
    const int32_t id = order[i];
    const std::string& t = v.bytes(id);
    if (t.empty()) {
      ++i;
      continue;
    }
    size_t common = 0;
    while (common < cur.size() && common < t.size() && cur[common] == t[common]) ++common;
    cur.resize(common);
    live.resize(common + 1);
    ended_at.resize(common + 1);
    ended_by.resize(common + 1);
    if (dead != std::string::npos && dead > common) dead = std::string::npos;
    while (dead == std::string::npos && cur.size() < t.size()) {
      const size_t d = cur.size();
      Step(g, live[d], static_cast<uint8_t>(t[d]), next);
      const bool ended = !next.empty() && next.front().empty();
      if (ended) next.erase(next.begin());
      cur.push_back(t[d]);
      live.push_back(next);
      ended_at.push_back(ended);
      ended_by.push_back(ended_by[d] || ended);
      if (next.empty()) dead = d + 1;
    }
    const size_t len = t.size();
    if (dead == std::string::npos || dead == len) {
      if (!live[len].empty() || ended_at[len]) {
        out.accepted.Set(id);
      } else if (ended_by[len - 1]) {
        out.uncertain.push_back(id);
      }
      ++i;
      continue;
    }
    // Dead before the token's end: every token sharing the dead prefix goes the same way.
    const size_t end = v.RangeEnd(i, dead);
    if (ended_by[dead]) {
      for (size_t j = i; j < end; ++j) out.uncertain.push_back(order[j]);
    }
    i = end;
  }
  return positions_.emplace(p, std::move(out)).first->second;
}

}  // namespace gemma2::structured
