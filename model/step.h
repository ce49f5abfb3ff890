// One forward step as every rank sees it: the same small plan on all ranks.
#pragma once

#include <cstdint>
#include <map>
#include <vector>

#include "model/kv_blocks.h"
#include "model/sampling.h"

namespace gemma2 {

struct StepSequence {
  int64_t sequence_id = 0;           // engine-level id; each rank maps it to its KV cache
  int64_t start_pos = 0;             // position of tokens[0]; the cache holds [0, start_pos)
  std::vector<int32_t> tokens;       // new tokens this step
  std::vector<int64_t> output_rows;  // indices into `tokens` whose outputs the caller wants
  RowSampling sampling;              // with StepPlan::ids_only: how its output rows pick tokens
  // With StepPlan::ids_only: its output rows draw only from StepPlan::token_masks[token_mask]
  // (structured output); -1: from the whole vocabulary.
  int32_t token_mask = -1;
};

// The tokens a row may draw: bit t % 64 of word t / 64 set = token t allowed, over the whole
// vocabulary ((vocab_size + 63) / 64 words). Each rank reads its own columns' bits.
using TokenMaskWords = std::vector<uint64_t>;
inline int64_t TokenMaskWordCount(int64_t vocab_size) { return (vocab_size + 63) / 64; }

// Before the step's sequences run: the empty cache of `dst` receives positions [0, tokens) of
// `src`'s cache (prefix reuse: a shared prompt prefix is copied, not recomputed).
struct KvCopy {
  int64_t src = 0, dst = 0, tokens = 0;
};

struct StepPlan {
  std::vector<StepSequence> sequences;
  // Applied in order after `released` and `kv_assign`, before `sequences`.
  std::vector<KvCopy> kv_copies;
  // The owner's block assignments for this step (KvBlockTables::Plan), applied after `released`:
  // every rank's tables then map each sequence's positions alike.
  std::vector<KvAssign> kv_assign;
  // Sample on the backend: only each output row's token id leaves it (causal LM only).
  bool ids_only = false;
  // With ids_only: the masks sequences name (StepSequence::token_mask); rows sharing a mask share
  // its entry.
  std::vector<TokenMaskWords> token_masks;
  // Sequences whose KV caches the ranks free before this step (the cluster's way to release).
  std::vector<int64_t> released;
  // The cached lengths after the copies: what ValidateStep checks start_pos against.
  static void ApplyCopies(const std::vector<KvCopy>& copies, std::map<int64_t, int64_t>& lengths) {
    for (const KvCopy& c : copies) lengths[c.dst] = c.tokens;
  }
  bool masked() const {
    for (const auto& s : sequences)
      if (s.token_mask >= 0) return true;
    return false;
  }
  int64_t total_tokens() const {
    int64_t n = 0;
    for (const auto& s : sequences) n += static_cast<int64_t>(s.tokens.size());
    return n;
  }
  int64_t total_outputs() const {
    int64_t n = 0;
    for (const auto& s : sequences) n += static_cast<int64_t>(s.output_rows.size());
    return n;
  }
};

// Output rows of a step in plan order: [total_outputs, width] row-major, fp32. For a causal LM the
// rows are softcapped logits over the whole vocabulary; for classifiers, raw scores per label.
struct StepOutput {
  int64_t rows = 0;
  int64_t width = 0;
  std::vector<float> values;  // empty when the plan asked for ids_only
  std::vector<int32_t> ids;   // one per row when the plan asked for ids_only
  // The cluster: the slowest rank's time in the step (its KV copies and forward pass), in
  // microseconds, summed over micro-batches; 0 where not measured (the in-process engine).
  int64_t rank_us = 0;
  const float* row(int64_t i) const { return values.data() + i * width; }
};

}  // namespace gemma2
