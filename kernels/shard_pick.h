// The vocab-parallel pick on the device, for rows that are greedy or temperature-only: twins of
// FillShardPick (slot width 2: [score, global id]) and DecideShardBest (model/shard_pick.h).
// Each rank scores its columns, the exchange [rows, tp * 2] is summed across ranks (zeros in the
// other ranks' slots), and every rank decides alike, so only ids leave the GPU.
#pragma once

#include <cstddef>

#include "kernels/sample.h"
#include "kernels/types.h"

namespace gemma2::kernels {

// Scratch ShardBestRows needs for `rows`.
size_t ShardBestScratchBytes(int64_t rows);

// exchange[r] = zeros, except slot `rank` = this shard's best score and its global id: the first
// maximum of x (greedy) or of x / temperature + GumbelNoise(seed, counter, vocab_begin + j).
cudaError_t ShardBestRows(const float* local, int64_t rows, int64_t shard, int64_t vocab_begin,
                          const DeviceSampling* params, int rank, int tp, void* scratch,
                          float* exchange, cudaStream_t stream);

// ids[r] = the global id of the best slot of the summed exchange row (ties: the lowest rank,
// which holds the lowest ids); 0 when no slot holds one.
cudaError_t DecideShardRows(const float* exchange, int64_t rows, int tp, int32_t* ids,
                            cudaStream_t stream);

}  // namespace gemma2::kernels
