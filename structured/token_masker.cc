#include "structured/token_masker.h"

#include <algorithm>
#include <bit>
#include <numeric>
#include <string_view>

namespace gemma2::structured {

namespace {

// The length of the well-formed UTF-8 character of two to four bytes at t[d] (the ranges JSON's
// string rule takes, structured/json_schema.cc), or 0.
size_t MultiByteChar(std::string_view t, size_t d) {
  auto in = [&](size_t k, int lo, int hi) {
    return d + k < t.size() && static_cast<uint8_t>(t[d + k]) >= lo && static_cast<uint8_t>(t[d + k]) <= hi;
  };
  const auto b = static_cast<uint8_t>(t[d]);
  if (b >= 0xc2 && b <= 0xdf) return in(1, 0x80, 0xbf) ? 2 : 0;
  if (b == 0xe0) return in(1, 0xa0, 0xbf) && in(2, 0x80, 0xbf) ? 3 : 0;
  if ((b >= 0xe1 && b <= 0xec) || b == 0xee || b == 0xef) return in(1, 0x80, 0xbf) && in(2, 0x80, 0xbf) ? 3 : 0;
  if (b == 0xed) return in(1, 0x80, 0x9f) && in(2, 0x80, 0xbf) ? 3 : 0;
  if (b == 0xf0) return in(1, 0x90, 0xbf) && in(2, 0x80, 0xbf) && in(3, 0x80, 0xbf) ? 4 : 0;
  if (b >= 0xf1 && b <= 0xf3) return in(1, 0x80, 0xbf) && in(2, 0x80, 0xbf) && in(3, 0x80, 0xbf) ? 4 : 0;
  if (b == 0xf4) return in(1, 0x80, 0x8f) && in(2, 0x80, 0xbf) && in(3, 0x80, 0xbf) ? 4 : 0;
  return 0;
}

// Bit d: t[d..] is whole characters of text (the end itself counts).
uint64_t TextSuffixes(std::string_view t) {
  std::vector<bool> ok(t.size() + 1, false);
  ok[t.size()] = true;
  for (size_t d = t.size(); d-- > 0;) {
    if (TokenVocabulary::Plain(static_cast<uint8_t>(t[d]))) {
      ok[d] = ok[d + 1];
    } else if (const size_t n = MultiByteChar(t, d); n > 0) {
      ok[d] = ok[d + n];
    }
  }
  uint64_t bits = 0;
  for (size_t d = 0; d < ok.size() && d < 64; ++d)
    if (ok[d]) bits |= uint64_t{1} << d;
  return bits;
}

}  // namespace

TokenVocabulary::TokenVocabulary(std::vector<std::string> bytes, std::vector<int32_t> stop_ids,
                                 bool whole)
    : stop_ids_(std::move(stop_ids)) {
  if (whole) {
    std::vector<std::string> others(bytes.size());
    std::vector<std::pair<int32_t, int64_t>> text;  // (id, characters)
    int64_t most = 0;
    for (size_t id = 0; id < bytes.size(); ++id) {
      const std::string& t = bytes[id];
      if (!t.empty() && t.size() < 64 && (TextSuffixes(t) & 1)) {
        int64_t chars = 0;
        for (char c : t) chars += (static_cast<uint8_t>(c) & 0xc0) != 0x80 ? 1 : 0;
        text.emplace_back(static_cast<int32_t>(id), chars);
        most = std::max(most, chars);
      } else {
        others[id] = t;
      }
    }
    text_masks_.resize(static_cast<size_t>(most) + 1);
    for (int64_t k = 0; k <= most; ++k) {
      TokenMask& m = text_masks_[static_cast<size_t>(k)];
      m.Reset(static_cast<int64_t>(bytes.size()));
      for (const auto& [id, chars] : text)
        if (chars <= k) m.Set(id);
    }
    rest_ = std::make_unique<TokenVocabulary>(std::move(others), stop_ids_, false);
  }
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
    text_from_.push_back(TextSuffixes(t));
    uint64_t starts = 0;
    for (size_t d = 0; d < t.size() && d < 64; ++d)
      if ((static_cast<uint8_t>(t[d]) & 0xc0) != 0x80) starts |= uint64_t{1} << d;
    char_starts_.push_back(starts);
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
  text_run_.push_back(kUnknown);
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

bool TokenMasker::Uniform(int32_t id, uint8_t lo, uint8_t hi) const {
  for (const Stack& st : *states_[static_cast<size_t>(id)]) {
    if (st.empty()) continue;
    const ByteSet& set =
        grammar_->sets[static_cast<size_t>(grammar_->code[static_cast<size_t>(st.back())].arg)];
    const bool first = set.test(lo);
    for (int b = lo + 1; b <= hi; ++b)
      if (set.test(static_cast<size_t>(b)) != first) return false;
  }
  return true;
}

int32_t TokenMasker::TextRun(int32_t id) {
  // Each well-formed character class as JSON's string rule spells it: its bytes' ranges.
  struct Range {
    uint8_t lo, hi;
  };
  static const std::vector<std::vector<Range>> kMultiByte = {
      {{0xc2, 0xdf}, {0x80, 0xbf}},
      {{0xe0, 0xe0}, {0xa0, 0xbf}, {0x80, 0xbf}},
      {{0xe1, 0xec}, {0x80, 0xbf}, {0x80, 0xbf}},
      {{0xed, 0xed}, {0x80, 0x9f}, {0x80, 0xbf}},
      {{0xee, 0xef}, {0x80, 0xbf}, {0x80, 0xbf}},
      {{0xf0, 0xf0}, {0x90, 0xbf}, {0x80, 0xbf}, {0x80, 0xbf}},
      {{0xf1, 0xf3}, {0x80, 0xbf}, {0x80, 0xbf}, {0x80, 0xbf}},
      {{0xf4, 0xf4}, {0x80, 0x8f}, {0x80, 0xbf}, {0x80, 0xbf}}};
  // Down the chain of states one character apart, then the lengths filled in on the way back.
  std::vector<int32_t> chain;
  int32_t s = id;
  int32_t run = 0;
  while (true) {
    const int32_t known = text_run_[static_cast<size_t>(s)];
    if (known != kUnknown) {
      run = known;
      break;
    }
    // Every plain byte steps alike (Step looks at a byte only through the sets), to a live state;
    // so does every character of each multi-byte class, and to that same state.
    bool like = Uniform(s, 0x20, 0x21) && Uniform(s, 0x23, 0x5b) && Uniform(s, 0x5d, 0x7e);
    int32_t next = kDead;
    if (like) {
      next = Next(s, 'a');
      for (uint8_t b : {uint8_t{0x20}, uint8_t{0x23}, uint8_t{0x5d}})
        like = like && Next(s, b) == next;
      like = like && next != kDead;
    }
    for (size_t c = 0; like && c < kMultiByte.size(); ++c) {
      int32_t x = s;
      for (const Range& r : kMultiByte[c]) {
        if (x == kDead || !Uniform(x, r.lo, r.hi)) {
          like = false;
          break;
        }
        x = Next(x, r.lo);
      }
      like = like && x == next;
    }
    if (!like || chain.size() >= vocab_->max_bytes()) {
      text_run_[static_cast<size_t>(s)] = 0;
      run = 0;
      break;
    }
    chain.push_back(s);
    s = next;
  }
  for (size_t k = chain.size(); k-- > 0;) text_run_[static_cast<size_t>(chain[k])] = ++run;
  return text_run_[static_cast<size_t>(id)];
}

void TokenMasker::Allowed(const State& state, TokenMask& mask) {
  if (states_.size() >= kInternedStates) {  // start over between walks (masks name state ids)
    states_.clear();
    ids_.clear();
    next_.clear();
    text_run_.clear();
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
bool TokenMasker::TextEnds(int32_t id, int32_t run) {
  int32_t x = id;
  for (int32_t k = 0; k < run && x != kDead; ++k) x = Next(x, 'a');  // known: TextRun stepped them
  if (x == kDead) return false;
  struct Range {
    uint8_t lo, hi;
  };
  // The first bytes of every character of text: plain ranges, then the multi-byte leads.
  static const Range kFirst[] = {{0x20, 0x21}, {0x23, 0x5b}, {0x5d, 0x7e}, {0xc2, 0xdf},
                                 {0xe0, 0xe0}, {0xe1, 0xec}, {0xed, 0xed}, {0xee, 0xef},
                                 {0xf0, 0xf0}, {0xf1, 0xf3}, {0xf4, 0xf4}};
  for (const Range& r : kFirst) {
    if (!Uniform(x, r.lo, r.hi) || Next(x, r.lo) != kDead) return false;
  }
  return true;
}

// A state inside text with room (a string body): the whole-text tokens of at most its room in
// characters are taken, and those of more are not when the text ends there; so only the other
// tokens are walked. Any other state walks every token.
void TokenMasker::Walk(int32_t start, TokenMask& mask) {
  const TokenVocabulary& v = *vocab_;
  mask.Reset(v.size());
  if (Complete(*states_[static_cast<size_t>(start)])) {
    for (int32_t id : v.stop_ids()) mask.Set(id);
  }
  if (v.rest()) {
    const int32_t run = TextRun(start);
    if (run > 0 && (run >= v.max_chars() || TextEnds(start, run))) {
      const TokenMask& text = *v.text_tokens(run);
      for (size_t w = 0; w < mask.words.size(); ++w) mask.words[w] |= text.words[w];
      WalkTokens(start, *v.rest(), mask);
      return;
    }
  }
  WalkTokens(start, v, mask);
}

void TokenMasker::WalkTokens(int32_t start, const TokenVocabulary& v, TokenMask& mask) {
  const char* arena = v.arena();
  const uint32_t* offset = v.offsets();
  const uint32_t* lcp = v.lcps();
  const int32_t* ids = v.sorted_ids();
  const uint64_t* text_from = v.text_from();
  const uint64_t* char_starts = v.char_starts();
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
    // The rest of the token whole characters of text, within the state's text run: taken, no
    // step needed (the states below this depth are not computed, so the next token starts here).
    if (d < 64 && ((text_from[i] >> d) & 1)) {
      int32_t run = text_run_[static_cast<size_t>(s)];
      if (run == kUnknown) run = TextRun(s);  // may grow the tables: no reference kept
      if (run >= std::popcount(char_starts[i] >> d)) {
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
