// What runs steps: the in-process Engine, or the coordinator's cluster of worker processes.
// Generation (model/generate.h) is written against this interface only.
#pragma once

#include <cstdint>
#include <map>

#include "common/status.h"
#include "model/config.h"
#include "model/step.h"

namespace gemma2 {

class StepExecutor {
 public:
  virtual ~StepExecutor() = default;
  virtual const ModelConfig& config() const = 0;
  // A new empty sequence; free it with ReleaseSequence.
  virtual int64_t NewSequence() = 0;
  virtual void ReleaseSequence(int64_t id) = 0;
  virtual int64_t SequenceLength(int64_t id) const = 0;
  // Validates the plan (ValidateStep), then runs it on every rank.
  virtual Result<StepOutput> Step(const StepPlan& plan) = 0;
};

// KV copies between known sequences into empty ones; then known sequences, start_pos == cached
// length (after the copies), token ids inside the vocabulary, positions below
// max_position_embeddings, output rows in range. `cached` maps sequence id -> cached tokens.
Status ValidateStep(const ModelConfig& c, const std::map<int64_t, int64_t>& cached,
                    const StepPlan& plan);

}  // namespace gemma2
