// Choosing each row's token when the vocabulary is split across tensor-parallel ranks, without
// assembling the rows: the same token SampleRow (model/sampling.h) would choose from the full row.
//
// Greedy and temperature-only rows are a maximum of per-token scores (SampleRow's Gumbel-max): each
// rank offers its best. Top-k / top-p rows: each rank offers its kShardCandidates largest values
// and its share of the softmax normalizer; the merged candidates decide the threshold exactly when
// it lies above every value a rank left out, and the draw is the Gumbel-max over the kept
// candidates. Otherwise (a flat distribution, a large top_k) the caller assembles the rows.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "model/sampling.h"

namespace gemma2 {

inline constexpr int64_t kShardCandidates = 64;

// Floats one rank contributes per row to the exchange (a sum over ranks of zero-padded slots):
// 2 when every row is greedy or temperature-only, more when some row has top-k / top-p.
int64_t ShardPickSlotWidth(std::span<const RowSampling> sampling);

// Fills this rank's slot of every row: `local` is [rows, shard] (this rank's logits columns,
// softcapped), its global ids start at `vocab_begin`. `exchange` is [rows, tp, slot] zeros.
void FillShardPick(std::span<const float> local, int64_t rows, int64_t shard, int64_t vocab_begin,
                   std::span<const RowSampling> sampling, int rank, int tp, int64_t width,
                   std::span<float> exchange);

// DecideShardPick when every row is greedy or temperature-only (slot width 2): each row's best
// slot's id, never undecided.
void DecideShardBest(std::span<const float> exchange, int64_t rows, int tp, int32_t* ids);

// After the sum over ranks: every row's token, or false when some row's threshold cannot be
// decided from the candidates (then no id is written and the rows must be assembled).
bool DecideShardPick(std::span<const float> exchange, int64_t rows, int tp, int64_t width,
                     int64_t vocab, std::span<const RowSampling> sampling, int32_t* ids);

}  // namespace gemma2
