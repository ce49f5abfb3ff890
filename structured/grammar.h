// A context-free grammar over bytes, as the constraint engine runs it: rules are alternatives of
// sequences; a sequence's elements are byte sets or references to rules. Built by the compilers
// (json_schema.h) through GrammarBuilder; no left recursion (every compiler's rules consume a
// byte before they recurse), repetition by right recursion, which the matcher runs in constant
// stack depth (a reference at the end of a sequence is a tail call).
#pragma once

#include <bitset>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace gemma2::structured {

using ByteSet = std::bitset<256>;

// One element of the flattened program: code[p] for a position p.
struct Element {
  enum class Kind : uint8_t { kBytes, kRule, kEnd };
  Kind kind = Kind::kEnd;
  int32_t arg = 0;  // kBytes: index into Grammar::sets; kRule: the rule
};

struct Grammar {
  std::vector<Element> code;                // every alternative's sequence, each ending in kEnd
  std::vector<ByteSet> sets;                // the byte sets kBytes elements name
  std::vector<std::vector<int32_t>> rules;  // rule -> its alternatives' first positions
  std::vector<std::string> rule_names;      // for errors and dumps
  int32_t root = 0;
};

class GrammarBuilder {
 public:
  // A rule's alternatives are added later (rules may refer to each other in any order).
  int32_t NewRule(std::string name);
  // Pieces of an alternative.
  struct Piece {
    bool is_rule = false;
    ByteSet bytes;
    int32_t rule = -1;
  };
  static Piece Bytes(const ByteSet& s) { return Piece{false, s, -1}; }
  static Piece Byte(uint8_t b);
  static Piece Ref(int32_t rule) { return Piece{true, {}, rule}; }
  void AddAlternative(int32_t rule, const std::vector<Piece>& pieces);

  // Conveniences that return a new rule.
  int32_t Literal(std::string_view text);               // exactly these bytes
  int32_t Set(const ByteSet& bytes);                    // one byte of the set
  int32_t Sequence(const std::vector<int32_t>& rules);  // one after another
  int32_t Choice(const std::vector<int32_t>& rules);    // any one of them
  int32_t Star(int32_t rule);                           // zero or more
  int32_t Optional(int32_t rule);                       // zero or one
  int32_t Repeat(int32_t rule, int64_t min, int64_t max);  // max < 0: unbounded
  int32_t Empty();

  Grammar Finish(int32_t root);

  // The budget of one grammar: kMaxRules rules and kMaxPieces sequence elements. Past the
  // elements' budget an alternative is not stored (a 4 MB literal costs nothing); compilers check
  // too_large() between elements and refuse the specification (one element may overshoot the
  // rules' budget by its own size: a string's maxLength adds 2 x maxLength rules).
  static constexpr size_t kMaxRules = 200000;
  static constexpr size_t kMaxPieces = 1000000;
  size_t rules() const { return alts_.size(); }
  bool too_large() const { return rules() > kMaxRules || pieces_ > kMaxPieces; }

 private:
  Grammar g_;
  std::vector<std::vector<std::vector<Piece>>> alts_;
  size_t pieces_ = 0;
};

}  // namespace gemma2::structured
