// Which heads, MLP columns, vocabulary rows and layers one rank owns (Megatron-style).
#pragma once

#include <string>

#include "common/status.h"
#include "model/config.h"

namespace gemma2 {

struct ShardPlan {
  int tp = 1;
  int rank = 0;
  // Query heads [q_head_begin, q_head_end) and the kv heads they read [kv_head_begin, kv_head_end):
  // split when kv_heads % tp == 0, replicated when tp % kv_heads == 0.
  int64_t q_head_begin = 0, q_head_end = 0;
  int64_t kv_head_begin = 0, kv_head_end = 0;
  int64_t inter_begin = 0, inter_end = 0;  // gate/up rows, down_proj columns
  int64_t vocab_begin = 0, vocab_end = 0;  // embedding / LM head rows (vocab parallel)
  int pp = 1;
  int stage = 0;                           // pipeline stage of this rank
  int64_t layer_begin = 0, layer_end = 0;  // the stage's contiguous layers

  int64_t q_heads() const { return q_head_end - q_head_begin; }
  int64_t kv_heads() const { return kv_head_end - kv_head_begin; }
  int64_t inter() const { return inter_end - inter_begin; }
  int64_t vocab() const { return vocab_end - vocab_begin; }
  bool first_stage() const { return stage == 0; }
  bool last_stage() const { return stage == pp - 1; }

  // The plan for tensor-parallel `rank` of `tp` in pipeline `stage` of `pp`, or an error saying why
  // this model cannot be split that way. Stages own contiguous layer ranges, the first ones one
  // layer more when the layers do not divide evenly.
  static Result<ShardPlan> Make(const ModelConfig& c, int tp, int rank, int pp = 1, int stage = 0);
};

}  // namespace gemma2
