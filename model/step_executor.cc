#include "model/step_executor.h"

#include <algorithm>
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
  const int64_t mask_words = TokenMaskWordCount(c.vocab_size);
  if (!plan.token_masks.empty() && !plan.ids_only)
    return InvalidArgument("token masks in a step that returns logits rows");
  for (size_t m = 0; m < plan.token_masks.size(); ++m) {
    const TokenMaskWords& w = plan.token_masks[m];
    if (static_cast<int64_t>(w.size()) != mask_words) {
      return InvalidArgument("token mask " + std::to_string(m) + ": " + std::to_string(w.size()) +
                             " words for a vocabulary of " + std::to_string(c.vocab_size) +
                             " (" + std::to_string(mask_words) + " words)");
    }
    // Some token inside the vocabulary must be left (the bits past it are not tokens).
    bool any = false;
    for (int64_t i = 0; i < mask_words && !any; ++i) {
      const int64_t valid = std::min<int64_t>(64, c.vocab_size - i * 64);
      const uint64_t keep = valid == 64 ? ~uint64_t{0} : (uint64_t{1} << valid) - 1;
      any = (w[static_cast<size_t>(i)] & keep) != 0;
    }
    if (!any) return InvalidArgument("token mask " + std::to_string(m) + " allows no token");
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
    if (s.token_mask < -1 || s.token_mask >= static_cast<int32_t>(plan.token_masks.size()))
      return InvalidArgument(who + ": token mask " + std::to_string(s.token_mask) + " does not exist");
    for (int64_t r : s.output_rows) {
      if (r < 0 || r >= static_cast<int64_t>(s.tokens.size())) {
        return InvalidArgument(who + ": output row " + std::to_string(r) + " out of range");
      }
    }
  }
  return OkStatus();
}

}  // namespace gemma2
