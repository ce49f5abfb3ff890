#include "engine/generate.h"

#include <algorithm>

namespace gemma2 {
namespace {

// Releases the engine's sequences however Generate/Classify leave.
class SequenceGuard {
 public:
  explicit SequenceGuard(StepExecutor& e) : engine_(e) {}
  ~SequenceGuard() {
    for (int64_t id : ids_) engine_.ReleaseSequence(id);
  }
  int64_t New() { return ids_.emplace_back(engine_.NewSequence()); }

 private:
  StepExecutor& engine_;
  std::vector<int64_t> ids_;
};

std::vector<float> Row(const StepOutput& out, int64_t i) {
  return {out.row(i), out.row(i) + out.width};
}

}  // namespace

Result<std::vector<GenerationResult>> Generate(StepExecutor& engine,
                                               const std::vector<GenerationRequest>& requests) {
  const ModelConfig& c = engine.config();
  if (c.is_classifier()) {
    return InvalidArgument(std::string(ArchitectureName(c.architecture)) +
                           " is a classifier: it scores inputs and does not generate");
  }
  for (size_t i = 0; i < requests.size(); ++i) {
    const auto& r = requests[i];
    const std::string who = "request " + std::to_string(i);
    if (r.prompt.empty()) return InvalidArgument(who + ": empty prompt");
    if (r.max_new_tokens < 0) return InvalidArgument(who + ": max_new_tokens must be >= 0");
    const int64_t total = static_cast<int64_t>(r.prompt.size()) + r.max_new_tokens;
    if (total > c.max_position_embeddings + 1) {
      return InvalidArgument(who + ": prompt (" + std::to_string(r.prompt.size()) +
                             " tokens) + max_new_tokens (" + std::to_string(r.max_new_tokens) +
                             ") exceeds the context of " +
                             std::to_string(c.max_position_embeddings) + " tokens");
    }
    RETURN_IF_ERROR(r.sampling.Validate().WithContext(who));
  }
  SequenceGuard guard(engine);
  std::vector<GenerationResult> results(requests.size());
  std::vector<int64_t> ids;
  for (size_t i = 0; i < requests.size(); ++i) ids.push_back(guard.New());
  // active[i]: request i wants more tokens; `next[i]` is the token to feed next.
  std::vector<bool> active(requests.size());
  std::vector<int32_t> next(requests.size());
  for (size_t i = 0; i < requests.size(); ++i) {
    active[i] = requests[i].max_new_tokens > 0;
    if (!active[i]) results[i].finish_reason = "length";
  }

  bool prefill = true;
  while (true) {
    StepPlan plan;
    std::vector<size_t> members;
    for (size_t i = 0; i < requests.size(); ++i) {
      if (!active[i]) continue;
      StepSequence s;
      s.sequence_id = ids[i];
      s.start_pos = engine.SequenceLength(ids[i]);
      if (prefill) {
        s.tokens = requests[i].prompt;
        const int64_t n = static_cast<int64_t>(s.tokens.size());
        if (requests[i].return_logits) {
          for (int64_t r = 0; r < n; ++r) s.output_rows.push_back(r);
        } else {
          s.output_rows.push_back(n - 1);
        }
      } else {
        s.tokens = {next[i]};
        s.output_rows = {0};
      }
      plan.sequences.push_back(std::move(s));
      members.push_back(i);
    }
    if (plan.sequences.empty()) break;
    // Unless a request wants its logits, the backend samples and only token ids come back.
    plan.ids_only = std::none_of(members.begin(), members.end(),
                                 [&](size_t i) { return requests[i].return_logits; });
    for (size_t m = 0; m < members.size(); ++m) {
      const size_t i = members[m];
      plan.sequences[m].sampling = {requests[i].sampling, results[i].generated.size()};
    }
    ASSIGN_OR_RETURN(StepOutput out, engine.Step(plan));
    int64_t row = 0;
    for (size_t m = 0; m < members.size(); ++m) {
      const size_t i = members[m];
      const auto& req = requests[i];
      auto& res = results[i];
      const int64_t rows = static_cast<int64_t>(plan.sequences[m].output_rows.size());
      if (req.return_logits) {
        for (int64_t k = 0; k < rows; ++k) res.logits.push_back(Row(out, row + k));
      }
      const int64_t last = row + rows - 1;
      row += rows;
      const int32_t tok =
          plan.ids_only ? out.ids[static_cast<size_t>(last)]
                        : SampleRow({out.row(last), static_cast<size_t>(out.width)},
                                    plan.sequences[m].sampling);
      res.generated.push_back(tok);
      const bool eos =
          std::find(c.eos_token_ids.begin(), c.eos_token_ids.end(), tok) != c.eos_token_ids.end();
      if (eos && !req.ignore_eos) {
        res.finish_reason = "stop";
        active[i] = false;
      } else if (static_cast<int64_t>(res.generated.size()) >= req.max_new_tokens) {
        res.finish_reason = "length";
        active[i] = false;
      }
      next[i] = tok;
    }
    prefill = false;
  }
  return results;
}

Result<ClassificationResult> Classify(StepExecutor& engine, const std::vector<int32_t>& tokens) {
  const ModelConfig& c = engine.config();
  if (!c.is_classifier()) {
    return InvalidArgument("Gemma2ForCausalLM has no classification head");
  }
  if (tokens.empty()) return InvalidArgument("empty input");
  SequenceGuard guard(engine);
  StepSequence s;
  s.sequence_id = guard.New();
  s.tokens = tokens;
  const int64_t n = static_cast<int64_t>(tokens.size());
  if (c.architecture == Architecture::kSequenceClassification) {
    int64_t last = 0;
    for (int64_t i = n - 1; i >= 0; --i) {
      if (tokens[static_cast<size_t>(i)] != c.pad_token_id) {
        last = i;
        break;
      }
    }
    s.output_rows = {last};
  } else {
    for (int64_t i = 0; i < n; ++i) s.output_rows.push_back(i);
  }
  StepPlan plan;
  plan.sequences.push_back(std::move(s));
  ASSIGN_OR_RETURN(StepOutput out, engine.Step(plan));
  ClassificationResult res;
  for (int64_t i = 0; i < out.rows; ++i) {
    res.logits.push_back(Row(out, i));
    const auto& row = res.logits.back();
    const auto best = std::max_element(row.begin(), row.end()) - row.begin();
    res.labels.push_back(c.id2label[static_cast<size_t>(best)]);
  }
  return res;
}

}  // namespace gemma2
