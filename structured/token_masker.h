// Which tokens a parse state allows: the tokenizer's tokens as bytes, sorted so that tokens
// sharing a prefix are walked once from the state (a state that dies on a prefix rejects its
// whole range at once). The mask of a state is kept (least recently used out): a structure's
// states recur (every character inside a string, every element of an array), so most steps are a
// lookup and a copy. Caching per grammar position instead (the top rule alone, with the tokens
// that run past its end checked per step) left 200000 of Gemma's tokens to check inside a JSON
// string, whose character rule ends after one character (bench/results/2026-12-03b-*).
#pragma once

#include <array>
#include <cstdint>
#include <list>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "structured/grammar.h"
#include "structured/matcher.h"

namespace gemma2::structured {

// A set of token ids, one bit each.
struct TokenMask {
  std::vector<uint64_t> words;
  void Reset(int64_t n) { words.assign(static_cast<size_t>((n + 63) / 64), 0); }
  void Set(int32_t id) { words[static_cast<size_t>(id) >> 6] |= uint64_t{1} << (id & 63); }
  bool Test(int32_t id) const { return (words[static_cast<size_t>(id) >> 6] >> (id & 63)) & 1; }
  int64_t Count() const;
};

class TokenVocabulary {
 public:
  // bytes[id]: what token id stands for; empty for tokens structured output never contains
  // (control, unknown, unused). `stop_ids`: the end-of-sequence tokens, allowed where complete.
  // `whole`: also keep the masks of whole-text tokens and the vocabulary of the others (not for
  // that sub-vocabulary itself).
  TokenVocabulary(std::vector<std::string> bytes, std::vector<int32_t> stop_ids, bool whole = true);
  int64_t size() const { return static_cast<int64_t>(sorted_.size()); }
  std::string_view bytes(int32_t id) const { return sorted_bytes(rank_[static_cast<size_t>(id)]); }
  const std::vector<int32_t>& stop_ids() const { return stop_ids_; }
  // The tokens in byte order, laid out for walks: sorted_id(i) is the i-th token, sorted_bytes(i)
  // its bytes (one contiguous arena), lcp(i) the bytes it shares with the (i-1)-th.
  size_t sorted_size() const { return sorted_.size(); }
  int32_t sorted_id(size_t i) const { return sorted_[i]; }
  std::string_view sorted_bytes(size_t i) const {
    return std::string_view(arena_).substr(offset_[i], offset_[i + 1] - offset_[i]);
  }
  size_t lcp(size_t i) const { return lcp_[i]; }
  // The same, as arrays for the masker's walk: offsets() has sorted_size() + 1 entries.
  const char* arena() const { return arena_.data(); }
  const uint32_t* offsets() const { return offset_.data(); }
  const uint32_t* lcps() const { return lcp_.data(); }
  // skips()[i]: the first token after the i-th whose lcp is smaller than the i-th's (sorted_size()
  // where none): every token between shares at least lcp(i) bytes with the i-th, so a walk skips
  // the tokens sharing a dead prefix in at most one jump per byte of it.
  const uint32_t* skips() const { return skip_.data(); }
  const int32_t* sorted_ids() const { return sorted_.data(); }
  size_t max_bytes() const { return max_bytes_; }
  // The plain bytes: printable ASCII but '"' and '\\' (a JSON string's ordinary characters).
  static bool Plain(uint8_t b) { return b >= 0x20 && b < 0x7f && b != '"' && b != '\\'; }
  // Text: plain bytes and well-formed UTF-8 characters of two to four bytes (as JSON strings
  // take them). text_from(i): bit d set where the i-th token's bytes from depth d on are whole
  // characters of text (d < 64); char_starts(i): bit d set where a character starts at d.
  const uint64_t* text_from() const { return text_from_.data(); }
  const uint64_t* char_starts() const { return char_starts_.data(); }
  // The tokens whose bytes are whole characters of text, at most k characters: text_tokens(k),
  // k up to max_chars(); null without them. rest(): every other token (the text ones empty).
  const TokenMask* text_tokens(int64_t k) const {
    return text_masks_.empty() ? nullptr : &text_masks_[static_cast<size_t>(std::min(k, max_chars()))];
  }
  int64_t max_chars() const { return static_cast<int64_t>(text_masks_.size()) - 1; }
  const TokenVocabulary* rest() const { return rest_.get(); }

 private:
  size_t max_bytes_ = 0;
  std::vector<uint64_t> text_from_, char_starts_;
  std::vector<TokenMask> text_masks_;
  std::unique_ptr<TokenVocabulary> rest_;
  std::vector<int32_t> stop_ids_;
  std::vector<int32_t> sorted_;  // token ids in byte order
  std::vector<uint32_t> rank_;   // a token id's index in sorted_
  std::string arena_;
  std::vector<uint32_t> offset_;
  std::vector<uint32_t> lcp_;
  std::vector<uint32_t> skip_;
};


class TokenMasker {
 public:
  TokenMasker(std::shared_ptr<const Grammar> grammar,
              std::shared_ptr<const TokenVocabulary> vocab);
  // The tokens allowed from `state`: every token whose bytes the state takes, and the stop ids
  // where the state is complete. Walks the vocabulary the first time it meets the state.
  void Allowed(const State& state, TokenMask& mask);
  int64_t walks() const { return walks_; }
  // What it holds now: states met, masks kept, and their bytes (the transition table's rows in
  // use, the masks, the states' stacks; the table's reserved address space not counted).
  struct Footprint {
    int64_t states = 0, masks = 0, bytes = 0;
  };
  Footprint footprint() const;
  const Grammar& grammar() const { return *grammar_; }
  const TokenVocabulary& vocab() const { return *vocab_; }

 private:
  // States are interned and their byte transitions kept, so a walk revisiting a state (inside a
  // string, after every ordinary character) costs a table lookup, not a parse step.
  int32_t Intern(const State& s);
  // The state after `byte` from state `id`, computed (and kept) where not known yet.
  int32_t Next(int32_t id, uint8_t byte);
  // How many characters of text in a row state `id` takes whatever they are: every plain byte
  // and every well-formed multi-byte character leads to one same state, which does the same,
  // and so on (a string body with room for them); capped at the longest token's bytes.
  int32_t TextRun(int32_t id);
  // Whether every character of text steps state `id` to the plain byte's state `next`, read from
  // the grammar positions on top of its stacks (no step taken): each stack whose top takes a
  // character's first byte takes the whole character and ends its alternative there (CharEnds),
  // and the stacks under those tops are the same for every kind of character. False where this
  // cannot tell; TextRun then steps each kind of character.
  bool TakesTextLikePlain(int32_t id);
  // Bit k (0: a plain byte, 1-8: the multi-byte classes) of position p: p's byte set takes kind
  // k's first bytes (all of them) and, from a stack of p alone, the whole character ends p's
  // alternative (one empty stack after it, none before); bit 16 + k: p takes some of k's first
  // bytes. Computed once per position.
  uint32_t CharEnds(int32_t p);
  // Whether every byte of `bytes` steps state `id` alike (each stack's set holds all or none).
  bool Uniform(int32_t id, const ByteSet& bytes) const;
  void Walk(int32_t start, TokenMask& mask);
  // The bits of the tokens of `v` that `start` takes (added to `mask`).
  void WalkTokens(int32_t start, const TokenVocabulary& v, TokenMask& mask);
  // Whether the state `run` characters of text after `id` takes no text byte at all (so no token
  // of more characters of text is taken from `id`).
  bool TextEnds(int32_t id, int32_t run);
  struct StateHash {
    size_t operator()(const State& s) const;
  };
  struct Entry {
    TokenMask mask;
    std::list<int32_t>::iterator age;
  };
  static constexpr size_t kCachedMasks = 512;       // 16 MB of masks at Gemma's vocabulary
  static constexpr size_t kInternedStates = 32768;  // then the tables start over (32 MB)
  // A walk adds only the states its tokens' prefixes reach: the limit is checked between walks.
  static constexpr int32_t kUnknown = -2, kDead = -1;

  std::shared_ptr<const Grammar> grammar_;
  std::shared_ptr<const TokenVocabulary> vocab_;
  std::unordered_map<State, int32_t, StateHash> ids_;
  std::vector<const State*> states_;  // by id: the keys of ids_ (stable while they stay)
  // [state][byte] -> state, kUnknown until computed, kDead where no stack is left.
  std::vector<int32_t> next_;
  std::vector<int32_t> text_run_;  // by state: TextRun, kUnknown until computed
  std::vector<int64_t> char_ends_;  // by grammar position: CharEnds, -1 until computed
  std::unordered_map<int32_t, Entry> masks_;
  std::list<int32_t> ages_;  // state ids, most recently used first
  int64_t walks_ = 0;
};

}  // namespace gemma2::structured
