// An in-process engine: `tp` ranks of RankModel, each on its own thread with its own backend and
// KV caches, summing through a LocalGroup. The cluster (coordinator/) runs the same ranks as
// worker processes.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "engine/backend_factory.h"
#include "model/checkpoint.h"
#include "model/rank_model.h"
#include "model/step.h"
#include "model/step_executor.h"

namespace gemma2 {

struct EngineOptions {
  // Every rank's backend (its device is the rank, its positions the model's).
  BackendOptions backend;
  int tp = 1;
  int threads = 0;               // cpu: math threads in all; 0: all cores
  int64_t kv_blocks = 0;         // KV blocks per rank; 0: what backend.kv_cache_bytes (cuda) gives
  int64_t kv_block_size = 16;    // positions per KV block
  Quantization quantization = Quantization::kNone;  // the projections' form (--quantization)
  KvCacheDtype kv_cache_dtype = KvCacheDtype::kAuto;  // the KV cache's (--kv-cache-dtype)
  RankModel::Progress progress;  // weight loading, summed over the ranks
};

// Prints loading progress to stderr ("NAME: loading 12.3 / 54.5 GB, 123 / 600 tensors, 2.1 GB/s"),
// at most twice a second and once at the end.
RankModel::Progress StderrLoadProgress(std::string name);

class Engine final : public StepExecutor {
 public:
  static Result<std::unique_ptr<Engine>> Create(const WeightSource& ck, const EngineOptions& opts);
  ~Engine() override;

  const ModelConfig& config() const override { return config_; }
  int tp() const { return static_cast<int>(ranks_.size()); }

  // A new empty sequence (a KV cache on every rank); free it with ReleaseSequence.
  int64_t NewSequence() override;
  void ReleaseSequence(int64_t id) override;
  int64_t SequenceLength(int64_t id) const override;
  const KvLayout& kv_layout() const override { return kv_->layout(); }
  int64_t kv_blocks() const override { return kv_->num_blocks(); }
  int64_t KvCopyFloor(int64_t id) const override { return kv_->CopyFloor(id); }

  // Validates the plan (known sequences, start_pos == cached length, token ids inside the
  // vocabulary, positions below max_position_embeddings, output rows in range), then runs it.
  Result<StepOutput> Step(const StepPlan& plan) override;
  Status health() const override { return down_; }

 private:
  struct Rank;
  Engine() = default;

  ModelConfig config_;
  std::vector<std::unique_ptr<Rank>> ranks_;
  std::map<int64_t, int64_t> lengths_;  // sequence id -> cached tokens
  std::unique_ptr<KvBlockTables> kv_;   // every rank's block tables (this process owns them)
  int64_t next_id_ = 1;
  Status down_;  // a rank failed mid-step: its caches may disagree with the others'
};

}  // namespace gemma2
