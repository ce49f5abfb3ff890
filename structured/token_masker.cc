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
    max_bytes_ = std::max(max_bytes_, t.size());
    size_t plain = t.size();
    while (plain > 0 && Plain(static_cast<uint8_t>(t[plain - 1]))) --plain;
    plain_from_.push_back(static_cast<uint8_t>(std::min<size_t>(plain, 255)));
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
  next_.resize(next_.size() + 256, kUnknown);
  plain_run_.push_back(kUnknown);
  return id;
}

int32_t TokenMasker::Next(int32_t id, uint8_t byte) {
  const size_t at = static_cast<size_t>(id) * 256 + byte;
  if (next_[at] != kUnknown) return next_[at];
  State after;
  Step(*grammar_, *states_[static_cast<size_t>(id)], byte, after);
  const int32_t n = after.empty() ? kDead : Intern(after);
  next_[at] = n;  // after Intern, which may have grown the table
  return n;
}

int32_t TokenMasker::PlainRun(int32_t id) {
  // Iterative down the chain, then the lengths filled in on the way back.
  std::vector<int32_t> chain;
  int32_t s = id;
  int32_t run = 0;
  while (true) {
    const int32_t known = plain_run_[static_cast<size_t>(s)];
    if (known != kUnknown) {
      run = known;
      break;
    }
    // Uniform: each stack's byte set holds every plain byte or none, so all plain bytes step
    // the state alike (Step looks at a byte only through the sets).
    bool uniform = true, takes = false;
    for (const Stack& st : *states_[static_cast<size_t>(s)]) {
      if (st.empty()) continue;
      const ByteSet& set = grammar_->sets[static_cast<size_t>(grammar_->code[static_cast<size_t>(st.back())].arg)];
      size_t in = 0;
      for (int b = 0x20; b < 0x7f; ++b) in += TokenVocabulary::Plain(static_cast<uint8_t>(b)) && set.test(static_cast<size_t>(b)) ? 1 : 0;
      if (in == 94) {
        takes = true;
      } else if (in != 0) {
        uniform = false;
        break;
      }
    }
    if (!uniform || !takes || chain.size() >= vocab_->max_bytes()) {
      plain_run_[static_cast<size_t>(s)] = 0;
      run = 0;
      break;
    }
    chain.push_back(s);
    s = Next(s, 'a');
    if (s == kDead) break;
  }
  for (size_t k = chain.size(); k-- > 0;) plain_run_[static_cast<size_t>(chain[k])] = ++run;
  return plain_run_[static_cast<size_t>(id)];
}

void TokenMasker::Allowed(const State& state, TokenMask& mask) {
  if (states_.size() >= kInternedStates) {  // start over between walks (masks name state ids)
    states_.clear();
    ids_.clear();
    next_.clear();
    plain_run_.clear();
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
// rejects skips every token that shares it. (Flat arrays and a known transition read inline: the
// walk is bound by these reads, about two per token at Gemma's vocabulary.)
void TokenMasker::Walk(int32_t start, TokenMask& mask) {
  const TokenVocabulary& v = *vocab_;
  mask.Reset(v.size());
  if (Complete(*states_[static_cast<size_t>(start)])) {
    for (int32_t id : v.stop_ids()) mask.Set(id);
  }
  const char* arena = v.arena();
  const uint32_t* offset = v.offsets();
  const uint32_t* lcp = v.lcps();
  const int32_t* ids = v.sorted_ids();
  const uint8_t* plain_from = v.plain_from();
  uint64_t* bits = mask.words.data();
  std::vector<int32_t> at(v.max_bytes() + 1);  // at[d]: the state after d bytes of the prefix
  at[0] = start;
  size_t depth = 0;  // at[0..depth] hold the current prefix's states
  const size_t n = v.sorted_size();
  for (size_t i = 0; i < n;) {
    const size_t len = offset[i + 1] - offset[i];
    if (len == 0) {
      ++i;
      continue;
    }
    const auto* t = reinterpret_cast<const uint8_t*>(arena + offset[i]);
    size_t d = std::min<size_t>(lcp[i], depth);
    int32_t s = at[d];
    // The rest of the token plain, within the state's plain run: taken, no step needed (the
    // states below this depth are not computed, so the next token starts from here).
    if (plain_from[i] <= d) {
      int32_t run = plain_run_[static_cast<size_t>(s)];
      if (run == kUnknown) run = PlainRun(s);  // may grow the tables: no reference kept
      if (run >= static_cast<int32_t>(len - d)) {
        depth = d;
        const int32_t id = ids[i];
        bits[static_cast<size_t>(id) >> 6] |= uint64_t{1} << (id & 63);
        ++i;
        continue;
      }
    }
    bool taken = true;
    while (d < len) {
      int32_t next = next_[static_cast<size_t>(s) * 256 + t[d]];
      if (next == kUnknown) next = Next(s, t[d]);
      if (next == kDead) {
        taken = false;
        break;
      }
      at[++d] = s = next;
    }
    depth = d;
    if (taken) {
      const int32_t id = ids[i];
      bits[static_cast<size_t>(id) >> 6] |= uint64_t{1} << (id & 63);
      ++i;
      continue;
    }
    // Every following token sharing the dead prefix (d + 1 bytes) dies with it.
    do {
      ++i;
    } while (i < n && lcp[i] > d);
  }
}

}  // namespace gemma2::structured
