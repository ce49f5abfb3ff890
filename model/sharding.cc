#include "model/sharding.h"

namespace gemma2 {

Result<ShardPlan> ShardPlan::Make(const ModelConfig& c, int tp, int rank, int pp, int stage) {
  if (pp < 1 || pp > c.num_layers) {
    return InvalidArgument("pp must be between 1 and the " + std::to_string(c.num_layers) +
                           " layers, got " + std::to_string(pp));
  }
  if (stage < 0 || stage >= pp) return InvalidArgument("stage " + std::to_string(stage) + " outside pp " + std::to_string(pp));
  const std::string why = "cannot shard " + std::to_string(c.num_heads) + " query heads / " +
                          std::to_string(c.num_kv_heads) + " kv heads / intermediate " +
                          std::to_string(c.intermediate_size) + " across tp=" + std::to_string(tp);
  if (tp < 1 || tp > 1024)
    return InvalidArgument("tp must be between 1 and 1024, got " + std::to_string(tp));
  if (rank < 0 || rank >= tp)
    return InvalidArgument("rank " + std::to_string(rank) + " outside tp " + std::to_string(tp));
  if (c.num_heads % tp != 0) {
    return InvalidArgument(why + ": num_attention_heads is not a multiple of tp");
  }
  const bool split_kv = c.num_kv_heads % tp == 0;
  const bool replicate_kv = tp % c.num_kv_heads == 0;
  if (!split_kv && !replicate_kv) {
    return InvalidArgument(why + ": num_key_value_heads must be a multiple or a divisor of tp");
  }
  if (c.intermediate_size % tp != 0) {
    return InvalidArgument(why + ": intermediate_size is not a multiple of tp");
  }
  ShardPlan p;
  p.tp = tp;
  p.rank = rank;
  const int64_t q_per_rank = c.num_heads / tp;
  const int64_t group = c.num_heads / c.num_kv_heads;  // q heads per kv head
  p.q_head_begin = rank * q_per_rank;
  p.q_head_end = p.q_head_begin + q_per_rank;
  p.kv_head_begin = p.q_head_begin / group;
  p.kv_head_end = (p.q_head_end - 1) / group + 1;
  const int64_t inter_per_rank = c.intermediate_size / tp;
  p.inter_begin = rank * inter_per_rank;
  p.inter_end = p.inter_begin + inter_per_rank;
  const int64_t vocab_per_rank = (c.vocab_size + tp - 1) / tp;
  p.vocab_begin = std::min<int64_t>(c.vocab_size, rank * vocab_per_rank);
  p.vocab_end = std::min<int64_t>(c.vocab_size, p.vocab_begin + vocab_per_rank);
  p.pp = pp;
  p.stage = stage;
  const int64_t per = c.num_layers / pp, extra = c.num_layers % pp;
  p.layer_begin = stage * per + std::min<int64_t>(stage, extra);
  p.layer_end = p.layer_begin + per + (stage < extra ? 1 : 0);
  return p;
}

}  // namespace gemma2
