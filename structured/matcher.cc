#include "structured/matcher.h"

#include <algorithm>

namespace gemma2::structured {
namespace {

// A stack this deep, or this many expansions for one stack: rules that recurse without
// consuming a byte (the compilers never build them; a bound, not a hang, if one ever did).
constexpr size_t kMaxDepth = 4096;
constexpr int kMaxExpansions = 1 << 16;

Status CloseBounded(const Grammar& g, Stack s, State& out, int& budget);

void Normalize(State& s) {
  std::sort(s.begin(), s.end());
  s.erase(std::unique(s.begin(), s.end()), s.end());
}

}  // namespace

Status Close(const Grammar& g, Stack s, State& out) {
  int budget = kMaxExpansions;
  return CloseBounded(g, std::move(s), out, budget);
}

namespace {
Status CloseBounded(const Grammar& g, Stack s, State& out, int& budget) {
  while (true) {
    if (--budget < 0) return InvalidArgument("grammar recursion consumes no input");
    if (s.empty()) {
      out.push_back(std::move(s));
      return OkStatus();
    }
    if (s.size() > kMaxDepth) return InvalidArgument("grammar recursion consumes no input");
    const int32_t p = s.back();
    const Element& e = g.code[static_cast<size_t>(p)];
    if (e.kind == Element::Kind::kBytes) {
      out.push_back(std::move(s));
      return OkStatus();
    }
    if (e.kind == Element::Kind::kEnd) {
      s.pop_back();
      continue;
    }
    // A rule reference: return to the next position (none for a tail call), enter each
    // alternative.
    s.pop_back();
    const int32_t next = p + 1;
    if (g.code[static_cast<size_t>(next)].kind != Element::Kind::kEnd) s.push_back(next);
    const std::vector<int32_t>& alts = g.rules[static_cast<size_t>(e.arg)];
    for (size_t a = 0; a + 1 < alts.size(); ++a) {
      Stack branch = s;
      branch.push_back(alts[a]);
      RETURN_IF_ERROR(CloseBounded(g, std::move(branch), out, budget));
    }
    if (alts.empty()) return OkStatus();  // a rule without alternatives matches nothing
    s.push_back(alts.back());
  }
}
}  // namespace

void Step(const Grammar& g, const State& in, uint8_t byte, State& out) {
  out.clear();
  for (const Stack& s : in) {
    if (s.empty()) continue;
    const int32_t p = s.back();
    if (!g.sets[static_cast<size_t>(g.code[static_cast<size_t>(p)].arg)].test(byte)) continue;
    Stack next = s;
    next.back() = p + 1;
    (void)Close(g, std::move(next), out);  // grammars are checked at Start
  }
  Normalize(out);
}

bool Takes(const Grammar& g, const State& in, std::string_view bytes) {
  State a = in, b;
  for (char c : bytes) {
    Step(g, a, static_cast<uint8_t>(c), b);
    if (b.empty()) return false;
    std::swap(a, b);
  }
  return true;
}

Result<State> Start(const Grammar& g) {
  State s;
  for (int32_t a : g.rules[static_cast<size_t>(g.root)]) RETURN_IF_ERROR(Close(g, Stack{a}, s));
  Normalize(s);
  return s;
}

}  // namespace gemma2::structured
