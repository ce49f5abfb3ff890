// One tensor-parallel rank of Gemma 2: its weight shard and the forward pass, written once for all
// backends and all tp degrees. Ops come from a Backend, sums across ranks from a Collective.
#pragma once

#include <array>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "collectives/collective.h"
#include "model/backend.h"
#include "model/quantization.h"
#include "model/sharding.h"
#include "model/step.h"
#include "model/weight_source.h"

namespace gemma2 {

struct LayerWeights {
  Tensor input_norm, post_attention_norm, pre_feedforward_norm, post_feedforward_norm;
  Tensor qkv;      // [ (q_heads + 2 kv_heads) * head_dim, hidden ]: this rank's rows of q, k, v
  Tensor o;        // [ hidden, q_heads * head_dim ]: this rank's input columns of o_proj
  Tensor gate_up;  // [ 2 * inter, hidden ]: this rank's rows of gate_proj then up_proj
  Tensor down;     // [ hidden, inter ]: this rank's input columns of down_proj
};

// A stage's links to its neighbours: 2-rank groups where the earlier stage is rank 0.
struct PipelineLinks {
  Collective* prev = nullptr;
  Collective* next = nullptr;
};

class RankModel {
 public:
  // Reads only this rank's slices of the checkpoint into `backend` memory.
  // Called after each tensor with the bytes and tensors this rank has read so far and in all.
  using Progress = std::function<void(int64_t bytes, int64_t total_bytes, int64_t tensors,
                                      int64_t total_tensors)>;
  // `quantization`: the form the projections take on the backend (model/quantization.h).
  static Result<std::unique_ptr<RankModel>> Load(const WeightSource& ck, const ShardPlan& plan,
                                                 Backend& backend, const Progress& progress = {},
                                                 Quantization quantization = Quantization::kNone);

  const ModelConfig& config() const { return config_; }
  const ShardPlan& plan() const { return plan_; }
  Backend& backend() { return backend_; }
  // The backend's KV pool for this stage's layers (Backend::CreateKvPool); returns its blocks.
  Result<int64_t> CreateKvPool(int64_t block_size, int64_t blocks,
                               KvCacheDtype dtype = KvCacheDtype::kAuto);
  // Steps whose sampled rows had to be assembled across ranks (top-k/top-p not decided by the
  // shards' candidates).
  int64_t shard_pick_fallbacks() const { return shard_pick_fallbacks_; }
  // The plan's KvCopy `c`, block by block through `kv` (assignments applied already).
  Status CopyKv(const KvBlockTables& kv, const KvCopy& c);

  // Runs `step` over the caches `kv` maps (its assignments, copies and releases applied). Every
  // rank of the group calls it with the same plan; every rank gets the same output.
  // Pipeline stages: every stage but the first receives the residual stream from `pipe.prev`, every
  // stage but the last sends it on through `pipe.next` and produces no output rows.
  Status Forward(const StepPlan& step, const KvBlockTables& kv, Collective& comm, StepOutput* out,
                 const PipelineLinks& pipe = {});

 private:
  RankModel(const ModelConfig& c, const ShardPlan& p, Backend& b)
      : config_(c), plan_(p), backend_(b) {}
  Status LoadWeights(const WeightSource& ck, const Progress& progress, Quantization quantization);
  // Bytes (in the backend's weight dtype) and tensors this rank loads.
  std::pair<int64_t, int64_t> LoadSize() const;
  std::array<std::vector<WeightPart>, 8> LayerParts(int64_t layer) const;
  // One weight in the backend's weight dtype: the parts' regions stacked by rows (q|k|v, gate|up).
  Result<Tensor> ReadStacked(const WeightSource& ck, const std::vector<WeightPart>& parts);
  Result<Tensor> Read(const WeightSource& ck, const std::string& name,
                      const std::vector<int64_t>& full_shape, const Region& region);
  AttentionParams AttentionFor(int64_t layer) const;
  float eps() const { return static_cast<float>(config_.rms_norm_eps); }

  // The forward pass in the order it runs (rank_model.cc).
  struct StepRows;
  struct Activations;
  static StepRows FlattenStep(const StepPlan& step, const KvBlockTables& kv);
  StepOutputKind OutputKind(const StepPlan& step, std::span<const RowSampling> sampling,
                            const Collective& comm) const;
  Activations AllocActivations(int64_t tokens);
  Status EmbedTokens(std::span<const int32_t> ids, Collective& comm, const PipelineLinks& pipe,
                     Tensor& x);
  Status TransformerLayer(size_t li, std::span<const SeqSlice> seqs, Collective& comm,
                          Activations& a);
  void AttentionBlock(size_t li, std::span<const SeqSlice> seqs, Activations& a);
  void MlpBlock(const LayerWeights& w, Activations& a);
  Status SumAddNorm(Collective& comm, Tensor& delta, const Tensor& post_w, const Tensor* next_w,
                    Activations& a);
  Status SendToNextStage(Tensor& x, const PipelineLinks& pipe, StepOutput* out);
  Status Heads(const StepRows& rows, StepOutputKind kind, Collective& comm, const Tensor& normed,
               StepOutput* out);
  Status LmHead(const Tensor& sel, const StepRows& rows, StepOutputKind kind,
                Collective& comm, StepOutput* out);
  // The sum across this rank's tensor-parallel group, in the step's stream order.
  Status Sum(Collective& comm, Tensor& x);
  // Each row's token from the vocabulary shards without assembling rows (model/shard_pick.h);
  // false when the rows must be assembled after all.
  Result<bool> PickAcrossShards(const Tensor& local, std::span<const RowSampling> rows,
                                Collective& comm, StepOutput* out);
  void Loaded(const Tensor& t);  // progress accounting

  int64_t shard_pick_fallbacks_ = 0;
  Progress progress_;
  int64_t loaded_bytes_ = 0, loaded_tensors_ = 0, total_bytes_ = 0, total_tensors_ = 0;

  const ModelConfig config_;
  const ShardPlan plan_;
  Backend& backend_;
  // Constant after Load.
  Tensor embed_;    // [vocab shard, hidden]
  Tensor lm_head_;  // [vocab shard, hidden]; the embedding when tied
  Tensor final_norm_;
  Tensor score_, score_bias_;  // classifiers: [num_labels, hidden] (+ [1, num_labels])
  std::vector<LayerWeights> layers_;
};

}  // namespace gemma2
