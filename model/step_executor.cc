#include "model/step_executor.h"

#include <set>
#include <string>

namespace gemma2 {

Status ValidateStep(const ModelConfig& c, const std::map<int64_t, int64_t>& cached,
                    const StepPlan& plan) {
  std::map<int64_t, int64_t> lengths = cached;
  for (const KvCopy& k : plan.kv_copies) {
    const std::string who = "KV copy " + std::to_string(k.src) + " -> " + std::to_string(k.dst);
    auto src = lengths.find(k.src), dst = lengths.find(k.dst);
    if (src == lengths.end() || dst == lengths.end())
      return InvalidArgument(who + ": unknown sequence");
    if (k.src == k.dst) return InvalidArgument(who + ": a sequence cannot copy itself");
    if (dst->second != 0) return InvalidArgument(who + ": the destination is not empty");
    if (k.tokens <= 0 || k.tokens > src->second) {
      return InvalidArgument(who + ": " + std::to_string(k.tokens) +
                             " tokens, but the source holds " + std::to_string(src->second));
    }
    dst->second = k.tokens;
  }
  std::set<int64_t> named;
  for (const StepSequence& s : plan.sequences) {
    const std::string who = "sequence " + std::to_string(s.sequence_id);
    auto it = lengths.find(s.sequence_id);
    if (it == lengths.end()) return InvalidArgument(who + " does not exist");
    if (!named.insert(s.sequence_id).second)
      return InvalidArgument(who + " appears twice in one step");
    if (s.start_pos != it->second) {
      return InvalidArgument(who + ": start_pos " + std::to_string(s.start_pos) +
                             " but the cache holds " + std::to_string(it->second) + " tokens");
    }
    if (s.tokens.empty()) return InvalidArgument(who + ": no tokens in this step");
    const int64_t end = s.start_pos + static_cast<int64_t>(s.tokens.size());
    if (end > c.max_position_embeddings) {
      return InvalidArgument(who + ": " + std::to_string(end) +
                             " tokens exceed max_position_embeddings " +
                             std::to_string(c.max_position_embeddings));
    }
    for (int32_t tok : s.tokens) {
      if (tok < 0 || tok >= c.vocab_size) {
        return InvalidArgument(who + ": token id " + std::to_string(tok) +
                               " is outside the vocabulary [0, " + std::to_string(c.vocab_size) +
                               ")");
      }
    }
    for (int64_t r : s.output_rows) {
      if (r < 0 || r >= static_cast<int64_t>(s.tokens.size())) {
        return InvalidArgument(who + ": output row " + std::to_string(r) + " out of range");
      }
    }
  }
  return OkStatus();
}

}  // namespace gemma2
