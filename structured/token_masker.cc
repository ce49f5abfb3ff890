#include "structured/token_masker.h"

#include <algorithm>
#include <bit>
#include <numeric>
#include <string_view>

namespace gemma2::structured {

TokenVocabulary::TokenVocabulary(std::vector<std::string> bytes, std::vector<int32_t> stop_ids)
    : stop_ids_(std::move(stop_ids)) {
  sorted_.resize(bytes.size());
  std::iota(sorted_.begin(), sorted_.end(), 0);
  std::sort(sorted_.begin(), sorted_.end(), [&](int32_t a, int32_t b) {
    return bytes[static_cast<size_t>(a)] < bytes[static_cast<size_t>(b)];
  });
  rank_.resize(sorted_.size());
  offset_.reserve(sorted_.size() + 1);
  lcp_.reserve(sorted_.size());
  std::string_view prev;
  for (int32_t id : sorted_) {
    const std::string& t = bytes[static_cast<size_t>(id)];
    rank_[static_cast<size_t>(id)] = static_cast<uint32_t>(offset_.size());
    size_t common = 0;
    while (common < prev.size() && common < t.size() && prev[common] == t[common]) ++common;
    lcp_.push_back(static_cast<uint32_t>(common));
    offset_.push_back(static_cast<uint32_t>(arena_.size()));
    arena_ += t;
    prev = t;
  }
  offset_.push_back(static_cast<uint32_t>(arena_.size()));
}

int64_t TokenMask::Count() const {
  int64_t n = 0;
  for (uint64_t w : words) n += std::popcount(w);
  return n;
}

TokenMasker::TokenMasker(std::shared_ptr<const Grammar> grammar,
                         std::shared_ptr<const TokenVocabulary> vocab)
    : grammar_(std::move(grammar)), vocab_(std::move(vocab)) {}

size_t TokenMasker::StateHash::operator()(const State& s) const {
  size_t h = s.size();
  for (const Stack& st : s) {
    h = h * 1000003u ^ st.size();
    for (int32_t p : st) h = h * 1000003u ^ static_cast<size_t>(p);
  }
  return h;
}

int32_t TokenMasker::Intern(const State& s) {
  if (auto it = ids_.find(s); it != ids_.end()) return it->second;
  const auto id = static_cast<int32_t>(states_.size());
  states_.push_back(&ids_.emplace(s, id).first->first);
  next_.emplace_back();
  next_.back().fill(kUnknown);
  return id;
}

int32_t TokenMasker::Next(int32_t id, uint8_t byte) {
  int32_t n = next_[static_cast<size_t>(id)][byte];
  if (n != kUnknown) return n;
  State after;
  Step(*grammar_, *states_[static_cast<size_t>(id)], byte, after);
  n = after.empty() ? kDead : Intern(after);
  next_[static_cast<size_t>(id)][byte] = n;
  return n;
}

void TokenMasker::Allowed(const State& state, TokenMask& mask) {
  if (states_.size() >= kInternedStates) {  // start over between walks (masks name state ids)
    states_.clear();
    ids_.clear();
    next_.clear();
    masks_.clear();
    ages_.clear();
  }
  const int32_t id = Intern(state);
  if (auto it = masks_.find(id); it != masks_.end()) {
    ages_.splice(ages_.begin(), ages_, it->second.age);
    mask = it->second.mask;
    return;
  }
  Walk(id, mask);
  ++walks_;
  if (masks_.size() >= kCachedMasks) {
    masks_.erase(ages_.back());
    ages_.pop_back();
  }
  ages_.push_front(id);
  masks_.emplace(id, Entry{mask, ages_.begin()});
}

// Every token from `start`, in byte order: the states after each depth of the current prefix are
// kept, so a token costs only the bytes it does not share with the one before; a prefix the state
// rejects skips every token that shares it.
void TokenMasker::Walk(int32_t start, TokenMask& mask) {
  const TokenVocabulary& v = *vocab_;
  mask.Reset(v.size());
  if (Complete(*states_[static_cast<size_t>(start)])) {
    for (int32_t id : v.stop_ids()) mask.Set(id);
  }
  std::vector<int32_t> at{start};   // at[d]: the state after d bytes of the current prefix
  size_t dead = std::string::npos;  // the depth where no stack was left
  const size_t n = v.sorted_size();
  for (size_t i = 0; i < n;) {
    const std::string_view t = v.sorted_bytes(i);
    if (t.empty()) {
      ++i;
      continue;
    }
    const size_t common = std::min(v.lcp(i), at.size() - 1);
    at.resize(common + 1);
    if (dead != std::string::npos && dead > common) dead = std::string::npos;
    while (dead == std::string::npos && at.size() - 1 < t.size()) {
      const size_t d = at.size() - 1;
      const int32_t next = Next(at[d], static_cast<uint8_t>(t[d]));
      if (next == kDead) {
        dead = d + 1;
        break;
      }
      at.push_back(next);
    }
    if (dead == std::string::npos) {  // every byte taken
      mask.Set(v.sorted_id(i));
      ++i;
      continue;
    }
    // Every following token sharing the dead prefix dies with it.
    do {
      ++i;
    } while (i < n && v.lcp(i) >= dead);
  }
}

}  // namespace gemma2::structured
