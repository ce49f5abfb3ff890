#include "structured/grammar.h"

namespace gemma2::structured {

int32_t GrammarBuilder::NewRule(std::string name) {
  g_.rule_names.push_back(std::move(name));
  alts_.emplace_back();
  return static_cast<int32_t>(alts_.size() - 1);
}

GrammarBuilder::Piece GrammarBuilder::Byte(uint8_t b) {
  ByteSet s;
  s.set(b);
  return Bytes(s);
}

void GrammarBuilder::AddAlternative(int32_t rule, const std::vector<Piece>& pieces) {
  pieces_ += pieces.size() + 1;
  if (pieces_ > kMaxPieces) return;  // too_large() from now on: the grammar is refused
  alts_[static_cast<size_t>(rule)].push_back(pieces);
}

int32_t GrammarBuilder::Literal(std::string_view text) {
  const int32_t r = NewRule("literal");
  if (pieces_ + text.size() > kMaxPieces) {  // not even built
    pieces_ += text.size();
    return r;
  }
  std::vector<Piece> p;
  p.reserve(text.size());
  for (char c : text) p.push_back(Byte(static_cast<uint8_t>(c)));
  AddAlternative(r, p);
  return r;
}


int32_t GrammarBuilder::Set(const ByteSet& bytes) {
  const int32_t r = NewRule("set");
  AddAlternative(r, {Bytes(bytes)});
  return r;
}

int32_t GrammarBuilder::Sequence(const std::vector<int32_t>& rules) {
  const int32_t r = NewRule("seq");
  std::vector<Piece> p;
  p.reserve(rules.size());
  for (int32_t x : rules) p.push_back(Ref(x));
  AddAlternative(r, p);
  return r;
}

int32_t GrammarBuilder::Choice(const std::vector<int32_t>& rules) {
  const int32_t r = NewRule("choice");
  for (int32_t x : rules) AddAlternative(r, {Ref(x)});
  return r;
}

int32_t GrammarBuilder::Star(int32_t rule) {
  const int32_t r = NewRule("star");
  AddAlternative(r, {Ref(rule), Ref(r)});  // tail call: constant stack depth
  AddAlternative(r, {});
  return r;
}

int32_t GrammarBuilder::Optional(int32_t rule) {
  const int32_t r = NewRule("opt");
  AddAlternative(r, {Ref(rule)});
  AddAlternative(r, {});
  return r;
}

int32_t GrammarBuilder::Empty() {
  const int32_t r = NewRule("empty");
  AddAlternative(r, {});
  return r;
}

// min copies, then (max - min) optional ones nested (x (x (x)?)?)? so each count parses one way.
int32_t GrammarBuilder::Repeat(int32_t rule, int64_t min, int64_t max) {
  std::vector<int32_t> parts(static_cast<size_t>(min), rule);
  if (max < 0) {
    parts.push_back(Star(rule));
  } else if (max > min) {
    int32_t tail = Optional(rule);
    for (int64_t i = min + 1; i < max; ++i) tail = Optional(Sequence({rule, tail}));
    parts.push_back(tail);
  }
  return parts.empty() ? Empty() : Sequence(parts);
}

Grammar GrammarBuilder::Finish(int32_t root) {
  Grammar g = std::move(g_);
  g.root = root;
  g.rules.assign(alts_.size(), {});
  for (size_t r = 0; r < alts_.size(); ++r) {
    for (const auto& alt : alts_[r]) {
      g.rules[r].push_back(static_cast<int32_t>(g.code.size()));
      for (const Piece& p : alt) {
        Element e;
        if (p.is_rule) {
          e.kind = Element::Kind::kRule;
          e.arg = p.rule;
        } else {
          e.kind = Element::Kind::kBytes;
          e.arg = static_cast<int32_t>(g.sets.size());
          g.sets.push_back(p.bytes);
        }
        g.code.push_back(e);
      }
      g.code.push_back(Element{Element::Kind::kEnd, 0});
    }
  }
  alts_.clear();
  return g;
}

}  // namespace gemma2::structured
