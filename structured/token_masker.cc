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
  // Next smaller lcp, right to left with a stack of candidates.
  skip_.assign(lcp_.size(), static_cast<uint32_t>(lcp_.size()));
  std::vector<uint32_t> stack;
  for (size_t i = lcp_.size(); i-- > 0;) {
    while (!stack.empty() && lcp_[stack.back()] >= lcp_[i]) stack.pop_back();
    if (!stack.empty()) skip_[i] = stack.back();
    stack.push_back(static_cast<uint32_t>(i));
  }
}

int64_t TokenMask::Count() const {
  int64_t n = 0;
  for (uint64_t w : words) n += std::popcount(w);
  return n;
}

TokenMasker::TokenMasker(std::shared_ptr<const Grammar> grammar,
                         std::shared_ptr<const TokenVocabulary> vocab)
    : grammar_(std::move(grammar)), vocab_(std::move(vocab)) {
  // Reserved (address space only, pages are touched as states come): a growing table never
  // copies itself in the middle of a step.
  next_.reserve(kInternedStates * 256);
  text_run_.reserve(kInternedStates);
}

size_t TokenMasker::StateHash::operator()(const State& s) const {
  size_t h = s.size();
  for (const Stack& st : s) {
    h = h * 1000003u ^ st.size();
    for (int32_t p : st) h = h * 1000003u ^ static_cast<size_t>(p);
  }
  return h;
}

TokenMasker::Footprint TokenMasker::footprint() const {
  Footprint f;
  f.states = static_cast<int64_t>(states_.size());
  f.masks = static_cast<int64_t>(masks_.size());
  f.bytes =
      static_cast<int64_t>(next_.size() * sizeof(int32_t) + text_run_.size() * sizeof(int32_t));
  for (const auto& [id, e] : masks_) f.bytes += static_cast<int64_t>(e.mask.words.size() * 8);
  for (const State* s : states_) {
    for (const Stack& st : *s)
      f.bytes += static_cast<int64_t>(st.size() * sizeof(int32_t) + sizeof(Stack));
  }
  return f;
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

bool TokenMasker::Uniform(int32_t id, const ByteSet& bytes) const {
  for (const Stack& st : *states_[static_cast<size_t>(id)]) {
    if (st.empty()) continue;
    const ByteSet in =
        grammar_->sets[static_cast<size_t>(grammar_->code[static_cast<size_t>(st.back())].arg)] &
        bytes;
    if (in.any() && in != bytes) return false;
  }
  return true;
}

namespace {

ByteSet ByteRange(uint8_t lo, uint8_t hi) {
  ByteSet s;
  for (int b = lo; b <= hi; ++b) s.set(static_cast<size_t>(b));
  return s;
}

// Text's characters as JSON's string rule spells them (structured/json_schema.cc): the plain
// bytes, and each well-formed multi-byte class as its bytes' sets, with a byte of each.
struct CharByte {
  ByteSet set;
  uint8_t any;
};
const ByteSet& PlainBytes() {
  static const ByteSet plain = [] {
    ByteSet s;
    for (int b = 0; b < 256; ++b)
      s.set(static_cast<size_t>(b), TokenVocabulary::Plain(static_cast<uint8_t>(b)));
    return s;
  }();
  return plain;
}
const std::vector<std::vector<CharByte>>& MultiByteClasses() {
  static const std::vector<std::vector<CharByte>> classes = [] {
    const std::vector<std::vector<std::pair<uint8_t, uint8_t>>> ranges = {
        {{0xc2, 0xdf}, {0x80, 0xbf}},
        {{0xe0, 0xe0}, {0xa0, 0xbf}, {0x80, 0xbf}},
        {{0xe1, 0xec}, {0x80, 0xbf}, {0x80, 0xbf}},
        {{0xed, 0xed}, {0x80, 0x9f}, {0x80, 0xbf}},
        {{0xee, 0xef}, {0x80, 0xbf}, {0x80, 0xbf}},
        {{0xf0, 0xf0}, {0x90, 0xbf}, {0x80, 0xbf}, {0x80, 0xbf}},
        {{0xf1, 0xf3}, {0x80, 0xbf}, {0x80, 0xbf}, {0x80, 0xbf}},
        {{0xf4, 0xf4}, {0x80, 0x8f}, {0x80, 0xbf}, {0x80, 0xbf}}};
    std::vector<std::vector<CharByte>> out;
    for (const auto& c : ranges) {
      out.emplace_back();
      for (const auto& [lo, hi] : c) out.back().push_back({ByteRange(lo, hi), lo});
    }
    return out;
  }();
  return classes;
}
// The first bytes of every character of text.
const ByteSet& TextFirstBytes() {
  static const ByteSet first = PlainBytes() | ByteRange(0xc2, 0xf4);
  return first;
}

}  // namespace

uint32_t TokenMasker::CharEnds(int32_t p) {
  if (char_ends_.empty()) char_ends_.assign(grammar_->code.size(), -1);
  int64_t& known = char_ends_[static_cast<size_t>(p)];
  if (known >= 0) return static_cast<uint32_t>(known);
  const Grammar& g = *grammar_;
  const ByteSet& set = g.sets[static_cast<size_t>(g.code[static_cast<size_t>(p)].arg)];
  // Each kind of character as its bytes' sets: a plain byte, then the multi-byte classes.
  std::vector<std::vector<CharByte>> kinds = {{CharByte{PlainBytes(), 'a'}}};
  for (const auto& c : MultiByteClasses()) kinds.push_back(c);
  uint32_t bits = 0;
  for (size_t k = 0; k < kinds.size(); ++k) {
    const ByteSet first = set & kinds[k][0].set;
    if (first.none()) continue;
    bits |= 1u << (16 + k);
    if (first != kinds[k][0].set) continue;
    State x = {Stack{p}}, after;
    bool ends = true;
    for (size_t b = 0; b < kinds[k].size() && ends; ++b) {
      for (const Stack& st : x) {  // no early end, and every byte of the set alike
        if (st.empty())
          ends = false;
        else if (b > 0) {
          const ByteSet in =
              g.sets[static_cast<size_t>(g.code[static_cast<size_t>(st.back())].arg)] &
              kinds[k][b].set;
          ends = ends && (in.none() || in == kinds[k][b].set);
        }
      }
      if (!ends) break;
      Step(g, x, kinds[k][b].any, after);
      std::swap(x, after);
    }
    if (ends && x.size() == 1 && x.front().empty()) bits |= 1u << k;
  }
  known = bits;
  return bits;
}

bool TokenMasker::TakesTextLikePlain(int32_t id) {
  constexpr size_t kKinds = 9;
  // The stacks under the tops that take each kind's first bytes (views into the interned state).
  std::array<std::vector<std::pair<const int32_t*, size_t>>, kKinds> under;
  for (const Stack& st : *states_[static_cast<size_t>(id)]) {
    if (st.empty()) continue;
    const uint32_t bits = CharEnds(st.back());
    for (size_t k = 0; k < kKinds; ++k) {
      if (!((bits >> (16 + k)) & 1)) continue;
      if (!((bits >> k) & 1)) return false;
      under[k].emplace_back(st.data(), st.size() - 1);
    }
  }
  if (under[0].empty()) return false;
  auto less = [](const auto& a, const auto& b) {
    return std::lexicographical_compare(a.first, a.first + a.second, b.first, b.first + b.second);
  };
  auto same = [](const auto& a, const auto& b) {
    return std::equal(a.first, a.first + a.second, b.first, b.first + b.second);
  };
  for (auto& u : under) {
    std::sort(u.begin(), u.end(), less);
    u.erase(std::unique(u.begin(), u.end(), same), u.end());
  }
  for (size_t k = 1; k < kKinds; ++k) {
    if (!std::equal(under[k].begin(), under[k].end(), under[0].begin(), under[0].end(), same))
      return false;
  }
  return true;
}

int32_t TokenMasker::TextRun(int32_t id) {
  // Down the chain of states one character apart, then the lengths filled in on the way back.
  // Runs are capped at `cap` characters (no token has more bytes): a state that steps to itself
  // runs `cap`; a chain of 2 x cap states without an end gives its first cap + 1 states `cap`
  // and leaves the rest for a later call (their runs are only known to be at least cap - k).
  const auto cap = static_cast<int32_t>(vocab_->max_bytes());
  std::vector<int32_t> chain;
  int32_t s = id;
  int32_t run = 0;
  while (true) {
    const int32_t known = text_run_[static_cast<size_t>(s)];
    if (known != kUnknown) {
      run = known;
      break;
    }
    if (chain.size() >= 2 * static_cast<size_t>(cap)) {
      for (size_t k = 0; k <= static_cast<size_t>(cap); ++k)
        text_run_[static_cast<size_t>(chain[k])] = cap;
      return cap;
    }
    // Every plain byte steps alike (Step looks at a byte only through the sets), to a live state;
    // so does every character of each multi-byte class, and to that same state.
    bool like = Uniform(s, PlainBytes());
    const int32_t next = like ? Next(s, 'a') : kDead;
    like = like && next != kDead;
    const bool known_alike = like && TakesTextLikePlain(s);
    for (const auto& cls : MultiByteClasses()) {
      if (known_alike) break;
      int32_t x = s;
      for (const CharByte& b : cls) {
        if (!like || x == kDead || !Uniform(x, b.set)) {
          like = false;
          break;
        }
        x = Next(x, b.any);
      }
      like = like && x == next;
    }
    if (!like) {
      text_run_[static_cast<size_t>(s)] = 0;
      run = 0;
      break;
    }
    if (next == s) {
      text_run_[static_cast<size_t>(s)] = run = cap;
      break;
    }
    chain.push_back(s);
    s = next;
  }
  for (size_t k = chain.size(); k-- > 0;) {
    run = std::min(run + 1, cap);
    text_run_[static_cast<size_t>(chain[k])] = run;
  }
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

bool TokenMasker::TextEnds(int32_t id, int32_t run) {
  int32_t x = id;
  for (int32_t k = 0; k < run && x != kDead; ++k) x = Next(x, 'a');  // known: TextRun stepped them
  if (x == kDead) return false;
  for (const Stack& st : *states_[static_cast<size_t>(x)]) {  // no stack takes a first byte
    if (!st.empty() &&
        (grammar_->sets[static_cast<size_t>(grammar_->code[static_cast<size_t>(st.back())].arg)] &
         TextFirstBytes())
            .any())
      return false;
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

// Every token from `start`, in byte order: the states after each depth of the current prefix are
// kept, so a token costs only the bytes it does not share with the one before; a prefix the state
// rejects skips every token that shares it. (Flat arrays and a known transition read inline: the
// walk is bound by these reads, about two per token at Gemma's vocabulary.)
void TokenMasker::WalkTokens(int32_t start, const TokenVocabulary& v, TokenMask& mask) {
  const char* arena = v.arena();
  const uint32_t* offset = v.offsets();
  const uint32_t* lcp = v.lcps();
  const uint32_t* skip = v.skips();
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
    // Every following token sharing the dead prefix (d + 1 bytes) dies with it: jumped over by
    // runs of tokens that share at least as much with each other.
    ++i;
    while (i < n && lcp[i] > d) i = skip[i];
  }
}

}  // namespace gemma2::structured
