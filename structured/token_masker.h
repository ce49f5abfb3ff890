// Which tokens a parse state allows: the tokenizer's tokens as bytes, sorted so that tokens
// sharing a prefix are walked once (a state that dies on a prefix rejects its whole range at
// once). Per grammar position (a stack's top) the walk is done once and kept: the tokens the top
// rule alone accepts, and the few "uncertain" ones that run past the end of that rule, which are
// checked against the whole stack at each step (as xgrammar splits context-independent and
// context-dependent tokens). A step's cost is then a union of bitsets and a short list.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "structured/grammar.h"
#include "structured/matcher.h"

namespace gemma2::structured {

class TokenVocabulary {
 public:
  // bytes[id]: what token id stands for; empty for tokens structured output never contains
  // (control, unknown, unused). `stop_ids`: the end-of-sequence tokens, allowed where complete.
  TokenVocabulary(std::vector<std::string> bytes, std::vector<int32_t> stop_ids);
  int64_t size() const { return static_cast<int64_t>(bytes_.size()); }
  const std::string& bytes(int32_t id) const { return bytes_[static_cast<size_t>(id)]; }
  const std::vector<int32_t>& stop_ids() const { return stop_ids_; }
  // Token ids in byte order, and the end of the run of sorted[i]'s neighbours sharing its first
  // `len` bytes (the first index after it).
  const std::vector<int32_t>& sorted() const { return sorted_; }
  size_t RangeEnd(size_t i, size_t len) const;

 private:
  std::vector<std::string> bytes_;
  std::vector<int32_t> stop_ids_;
  std::vector<int32_t> sorted_;
};

// A set of token ids, one bit each.
struct TokenMask {
  std::vector<uint64_t> words;
  void Reset(int64_t n) { words.assign(static_cast<size_t>((n + 63) / 64), 0); }
  void Set(int32_t id) { words[static_cast<size_t>(id) >> 6] |= uint64_t{1} << (id & 63); }
  bool Test(int32_t id) const { return (words[static_cast<size_t>(id) >> 6] >> (id & 63)) & 1; }
  int64_t Count() const;
};

class TokenMasker {
 public:
  TokenMasker(std::shared_ptr<const Grammar> grammar,
              std::shared_ptr<const TokenVocabulary> vocab);
  // The tokens allowed from `state`: every token whose bytes the state takes, and the stop ids
  // where the state is complete. Walks a position the first time it is a stack's top.
  void Allowed(const State& state, TokenMask& mask);
  const Grammar& grammar() const { return *grammar_; }
  const TokenVocabulary& vocab() const { return *vocab_; }

 private:
  struct PositionTokens {
    TokenMask accepted;              // taken by the top rule alone
    std::vector<int32_t> uncertain;  // run past the top rule's end: checked per stack
  };
  const PositionTokens& ForPosition(int32_t p);

  std::shared_ptr<const Grammar> grammar_;
  std::shared_ptr<const TokenVocabulary> vocab_;
  std::unordered_map<int32_t, PositionTokens> positions_;
};

}  // namespace gemma2::structured
