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
  int64_t layer_begin = 0, layer_end = 0;  // pipeline stage: all layers for now

  int64_t q_heads() const { return q_head_end - q_head_begin; }
  int64_t kv_heads() const { return kv_head_end - kv_head_begin; }
  int64_t inter() const { return inter_end - inter_begin; }
  int64_t vocab() const { return vocab_end - vocab_begin; }

  // The plan for `rank` of `tp`, or an error saying why this model cannot be split tp ways.
  static Result<ShardPlan> Make(const ModelConfig& c, int tp, int rank);
};

}  // namespace gemma2
