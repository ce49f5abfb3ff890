// What runs steps: the in-process Engine, or the coordinator's cluster of worker processes.
// Generation (model/generate.h) is written against this interface only.
#pragma once

#include <cstdint>
#include <deque>
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
  // The KV cache the executor's block tables (model/kv_blocks.h) cover: its layout and blocks.
  virtual const KvLayout& kv_layout() const = 0;
  virtual int64_t kv_blocks() const = 0;
  // The shortest prefix of sequence `id` a KvCopy may take (sliding windows drop old blocks).
  virtual int64_t KvCopyFloor(int64_t id) const = 0;
  // Validates the plan (ValidateStep), then runs it on every rank.
  virtual Result<StepOutput> Step(const StepPlan& plan) = 0;
  // OK while steps can run. A plan refused before any rank ran it (ValidateStep, the block
  // tables) leaves it OK: only that plan's sequences fail. Once a rank failed mid-step, lost or
  // hung, it holds why and no step runs again.
  virtual Status health() const { return OkStatus(); }

  // Pipelined steps ("pipelined generation"): up to pipeline_depth() plans may be in flight at
  // once, over disjoint sequences, so pipeline stages work on different plans at the same time.
  // Submit validates and starts a plan; Collect waits for the oldest one's output. By default a
  // plan runs when it is collected (depth 1).
  virtual int pipeline_depth() const { return 1; }
  virtual Status Submit(const StepPlan& plan) {
    submitted_.push_back(plan);
    return OkStatus();
  }
  virtual Result<StepOutput> Collect() {
    if (submitted_.empty()) return Internal("Collect without a submitted step");
    const StepPlan plan = std::move(submitted_.front());
    submitted_.pop_front();
    return Step(plan);
  }

 private:
  std::deque<StepPlan> submitted_;
};

// KV copies between known sequences into empty ones; then known sequences, each at most once,
// start_pos == cached
// length (after the copies), token ids inside the vocabulary, positions below
// max_position_embeddings, output rows in range. `cached` maps sequence id -> cached tokens.
Status ValidateStep(const ModelConfig& c, const std::map<int64_t, int64_t>& cached,
                    const StepPlan& plan);

}  // namespace gemma2
