// Running a Grammar over bytes: the parse state is a set of stacks of positions (Grammar::code
// indices); a stack's top is a byte-set position, and an empty stack means the root rule has
// ended (the output may stop there). Ambiguity costs stacks, never correctness.
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

#include "common/status.h"
#include "structured/grammar.h"

namespace gemma2::structured {

using Stack = std::vector<int32_t>;
using State = std::vector<Stack>;  // sorted, unique

// Expands `s` until every stack's top is a byte set or the stack is empty, into `out` (appended).
// Fails on a grammar whose rules recurse without consuming a byte.
Status Close(const Grammar& g, Stack s, State& out);
// The state after `byte` from `in` (empty: no stack takes it).
void Step(const Grammar& g, const State& in, uint8_t byte, State& out);
// Whether `in` takes every byte of `bytes`.
bool Takes(const Grammar& g, const State& in, std::string_view bytes);
// The state from which the root rule starts.
Result<State> Start(const Grammar& g);
inline bool Complete(const State& s) { return !s.empty() && s.front().empty(); }

}  // namespace gemma2::structured
