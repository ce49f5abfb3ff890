#include "model/rank_model.h"

#include <algorithm>
#include <cmath>

#include "common/sampling_noise.h"
#include "model/shard_pick.h"

namespace gemma2 {

Result<int64_t> RankModel::CreateKvPool(int64_t block_size, int64_t blocks, KvCacheDtype dtype) {
  // Caches for this stage's layers only, indexed from the stage's first layer.
  std::vector<KvGroup> groups;
  for (int64_t l = plan_.layer_begin; l < plan_.layer_end; ++l)
    groups.push_back(KvLayout::GroupOf(config_, l));
  return backend_.CreateKvPool(groups, plan_.kv_heads(), config_.head_dim, block_size, blocks,
                               dtype);
}

Status RankModel::CopyKv(const KvBlockTables& kv, const KvCopy& c) {
  std::vector<int32_t> from, to;
  RETURN_IF_ERROR(kv.CopyPairs(c.src, c.dst, c.tokens, &from, &to));
  return backend_.CopyKvBlocks(from, to);
}

Result<std::unique_ptr<RankModel>> RankModel::Load(const WeightSource& ck, const ShardPlan& plan,
                                                   Backend& backend, const Progress& progress,
                                                   Quantization quantization) {
  std::unique_ptr<RankModel> m(new RankModel(ck.config(), plan, backend));
  RETURN_IF_ERROR(m->LoadWeights(ck, progress, quantization));
  return m;
}

std::pair<int64_t, int64_t> RankModel::LoadSize() const {
  const ModelConfig& c = config_;
  const ShardPlan& p = plan_;
  const int64_t h = c.hidden_size;
  int64_t elems = 0, tensors = 0;
  const bool tied = c.architecture == Architecture::kCausalLM && c.tie_word_embeddings;
  if (p.first_stage() || (p.last_stage() && tied)) {
    elems += p.vocab() * h;  // embedding
    ++tensors;
  }
  if (p.last_stage()) {
    elems += h;  // final norm
    ++tensors;
    if (c.architecture == Architecture::kCausalLM && !c.tie_word_embeddings) {
      elems += p.vocab() * h;
      ++tensors;
    }
    if (c.is_classifier()) {
      elems += c.num_labels * h;
      ++tensors;
    }
    if (c.architecture == Architecture::kTokenClassification) {
      elems += c.num_labels;  // score.bias
      ++tensors;
    }
  }
  for (int64_t l = p.layer_begin; l < p.layer_end; ++l) {
    for (const auto& parts : LayerParts(l)) {
      for (const WeightPart& part : parts) elems += part.region.rows() * part.region.cols();
      ++tensors;
    }
  }
  return {elems * DTypeSize(backend_.weight_dtype()), tensors};
}

void RankModel::Loaded(const Tensor& t) {
  loaded_bytes_ += t.numel() * DTypeSize(t.dtype);
  ++loaded_tensors_;
  if (progress_) progress_(loaded_bytes_, total_bytes_, loaded_tensors_, total_tensors_);
}

Result<Tensor> RankModel::Read(const WeightSource& ck, const std::string& name,
                               const std::vector<int64_t>& full_shape, const Region& region) {
  return ReadStacked(ck, {{name, full_shape, region}});
}

Result<Tensor> RankModel::ReadStacked(const WeightSource& ck,
                                      const std::vector<WeightPart>& parts) {
  int64_t rows = 0, cols = -1;
  for (const WeightPart& p : parts) {
    RETURN_IF_ERROR(ck.CheckShape(p.name, p.full_shape));
    if (cols >= 0 && p.region.cols() != cols)
      return Internal("stacking weights of different widths: " + p.name);
    rows += p.region.rows();
    cols = p.region.cols();
  }
  const DType dt = backend_.weight_dtype();
  auto fill = [&](int64_t r0, int64_t r1, void* dst) {
    return ReadStackedRows(ck, parts, dt, r0, r1, dst);
  };
  ASSIGN_OR_RETURN(Tensor t, backend_.UploadRows(dt, rows, cols, fill));
  Loaded(t);
  return t;
}

// Where each weight of layer l comes from, in load order: the four norms, q|k|v, o, gate|up, down.
std::array<std::vector<WeightPart>, 8> RankModel::LayerParts(int64_t l) const {
  const ModelConfig& c = config_;
  const ShardPlan& p = plan_;
  const int64_t h = c.hidden_size, hd = c.head_dim;
  const std::string pre = "layers." + std::to_string(l) + ".";
  auto rows = [](int64_t r0, int64_t r1, int64_t cols) { return Region{r0, r1, 0, cols}; };
  auto cols = [](int64_t rows_n, int64_t c0, int64_t c1) { return Region{0, rows_n, c0, c1}; };
  auto norm = [&](const char* name) {
    return std::vector<WeightPart>{{pre + name + ".weight", {h}, cols(1, 0, h)}};
  };
  const Region q = rows(p.q_head_begin * hd, p.q_head_end * hd, h);
  const Region kv = rows(p.kv_head_begin * hd, p.kv_head_end * hd, h);
  const Region inter = rows(p.inter_begin, p.inter_end, h);
  return {norm("input_layernorm"),
          norm("post_attention_layernorm"),
          norm("pre_feedforward_layernorm"),
          norm("post_feedforward_layernorm"),
          {{pre + "self_attn.q_proj.weight", {c.q_size(), h}, q},
           {pre + "self_attn.k_proj.weight", {c.kv_size(), h}, kv},
           {pre + "self_attn.v_proj.weight", {c.kv_size(), h}, kv}},
          {{pre + "self_attn.o_proj.weight",
            {h, c.q_size()},
            cols(h, p.q_head_begin * hd, p.q_head_end * hd)}},
          {{pre + "mlp.gate_proj.weight", {c.intermediate_size, h}, inter},
           {pre + "mlp.up_proj.weight", {c.intermediate_size, h}, inter}},
          {{pre + "mlp.down_proj.weight",
            {h, c.intermediate_size},
            cols(h, p.inter_begin, p.inter_end)}}};
}

Status RankModel::LoadWeights(const WeightSource& ck, const Progress& progress,
                              Quantization quantization) {
  progress_ = progress;
  std::tie(total_bytes_, total_tensors_) = LoadSize();
  const ModelConfig& c = config_;
  const ShardPlan& p = plan_;
  const int64_t h = c.hidden_size;
  auto rows = [](int64_t r0, int64_t r1, int64_t cols) { return Region{r0, r1, 0, cols}; };
  auto cols = [](int64_t rows_n, int64_t c0, int64_t c1) { return Region{0, rows_n, c0, c1}; };
  // A checkpoint reads one layer ahead of the copies in the background (WillRead).
  auto will_read = [&](int64_t l) {
    if (l >= p.layer_end) return;
    for (const auto& parts : LayerParts(l)) {
      for (const WeightPart& part : parts) ck.WillRead(part.name, part.region);
    }
  };

  // The embedding lives on the first stage (and on the last when tied to the LM head); the final
  // norm and the heads on the last stage.
  const bool tied_head = c.architecture == Architecture::kCausalLM &&
                         (c.tie_word_embeddings || !ck.Has("lm_head.weight"));
  const Region vocab_rows = rows(p.vocab_begin, p.vocab_end, h);
  const bool has_embed = p.first_stage() || (p.last_stage() && tied_head);
  if (has_embed) ck.WillRead("embed_tokens.weight", vocab_rows);
  will_read(p.layer_begin);
  if (has_embed) {
    ASSIGN_OR_RETURN(embed_, Read(ck, "embed_tokens.weight", {c.vocab_size, h}, vocab_rows));
  }
  if (!p.last_stage()) {
    // no head on this stage
  } else if (c.architecture == Architecture::kCausalLM) {
    ASSIGN_OR_RETURN(final_norm_, Read(ck, "norm.weight", {h}, cols(1, 0, h)));
    if (tied_head) {
      lm_head_ = embed_;
    } else {
      ASSIGN_OR_RETURN(lm_head_, Read(ck, "lm_head.weight", {c.vocab_size, h}, vocab_rows));
    }
  } else {
    ASSIGN_OR_RETURN(final_norm_, Read(ck, "norm.weight", {h}, cols(1, 0, h)));
    ASSIGN_OR_RETURN(score_, Read(ck, "score.weight", {c.num_labels, h}, rows(0, c.num_labels, h)));
    if (c.architecture == Architecture::kTokenClassification) {
      ASSIGN_OR_RETURN(score_bias_,
                       Read(ck, "score.bias", {c.num_labels}, cols(1, 0, c.num_labels)));
    }
  }

  for (int64_t l = p.layer_begin; l < p.layer_end; ++l) {
    will_read(l + 1);
    const auto parts = LayerParts(l);
    LayerWeights w;
    Tensor* dst[] = {&w.input_norm,
                     &w.post_attention_norm,
                     &w.pre_feedforward_norm,
                     &w.post_feedforward_norm,
                     &w.qkv,
                     &w.o,
                     &w.gate_up,
                     &w.down};
    for (size_t i = 0; i < parts.size(); ++i) {
      ASSIGN_OR_RETURN(*dst[i], ReadStacked(ck, parts[i]));
      const bool projection = i >= 4;  // q|k|v, o, gate|up, down
      if (projection && quantization == Quantization::kFp8) RETURN_IF_ERROR(backend_.QuantizeFp8(*dst[i]));
    }
    layers_.push_back(std::move(w));
  }
  return backend_.FinishUploads();
}

Result<bool> RankModel::PickAcrossShards(const Tensor& local, std::span<const RowSampling> rows,
                                         Collective& comm, StepOutput* out) {
  Backend& b = backend_;
  const int64_t r = local.rows, v = local.cols, tp = comm.size();
  std::vector<float> logits(static_cast<size_t>(r * v));
  RETURN_IF_ERROR(b.ToHost(local, logits.data()));
  const int64_t width = ShardPickSlotWidth(rows);
  std::vector<float> slots(static_cast<size_t>(r * tp * width), 0.0f);
  FillShardPick(logits, r, v, plan_.vocab_begin, rows, comm.rank(), static_cast<int>(tp), width,
                slots);
  ASSIGN_OR_RETURN(Tensor exchange, b.OutputFromHost(slots.data(), r, tp * width));
  RETURN_IF_ERROR(comm.AllReduceSum(exchange));
  RETURN_IF_ERROR(b.ToHost(exchange, slots.data()));
  // Every rank holds the same sums, so every rank decides alike (also to fall back).
  return DecideShardPick(slots, r, static_cast<int>(tp), width, config_.vocab_size, rows,
                         out->ids.data());
}

AttentionParams RankModel::AttentionFor(int64_t layer) const {
  AttentionParams a;
  a.q_heads = plan_.q_heads();
  a.kv_heads = plan_.kv_heads();
  a.head_dim = config_.head_dim;
  a.scale = static_cast<float>(1.0 / std::sqrt(config_.query_pre_attn_scalar));
  a.softcap = static_cast<float>(config_.attn_logit_softcap);
  a.window = config_.layer_is_sliding[static_cast<size_t>(layer)] ? config_.sliding_window : 0;
  a.rope_theta = config_.rope_theta;
  return a;
}

// A step's plan flattened: the token ids in order, each sequence's slice of them (rows and KV
// tables), the rows whose outputs are asked for and how each is sampled.
struct RankModel::StepRows {
  std::vector<int32_t> ids;
  std::vector<SeqSlice> seqs;
  std::vector<int64_t> out_rows;
  std::vector<RowSampling> sampling;  // one per output row
  // Structured output (ids_only steps with token masks): each output row's mask in the plan's
  // token_masks (-1: none); empty when no row has one.
  std::span<const TokenMaskWords> masks;
  std::vector<int32_t> row_mask;
};

// One layer's activations, reused by every layer (all layers of a rank have the same shapes).
struct RankModel::Activations {
  Tensor x;       // the residual stream
  Tensor normed;  // the next block's normed input (the final-normed states after the last layer)
  Tensor qkv, attn, o, gate_up, act, down;
};

RankModel::StepRows RankModel::FlattenStep(const StepPlan& step, const KvBlockTables& kv) {
  StepRows rows;
  for (const StepSequence& s : step.sequences) {
    const int64_t row0 = static_cast<int64_t>(rows.ids.size());
    rows.seqs.push_back(
        {{kv.table(s.sequence_id, KvGroup::kFull), kv.table(s.sequence_id, KvGroup::kSliding)},
         s.start_pos,
         static_cast<int64_t>(s.tokens.size()),
         row0});
    rows.ids.insert(rows.ids.end(), s.tokens.begin(), s.tokens.end());
    for (int64_t r : s.output_rows) {
      rows.out_rows.push_back(row0 + r);
      rows.sampling.push_back(s.sampling);
    }
  }
  if (step.ids_only && step.masked()) {
    rows.masks = step.token_masks;
    for (const StepSequence& s : step.sequences) rows.row_mask.insert(rows.row_mask.end(), s.output_rows.size(), s.token_mask);
  }
  return rows;
}

// Logits rows, or only ids: all greedy; sampled with the vocab-parallel pick on the backend
// (greedy / temperature-only rows, or one rank); sampled with a top-k / top-p row across ranks,
// whose pick runs on the host.
StepOutputKind RankModel::OutputKind(const StepPlan& step, std::span<const RowSampling> sampling,
                                     const Collective& comm) const {
  if (!step.ids_only || config_.architecture != Architecture::kCausalLM)
    return StepOutputKind::kLogits;
  const bool greedy = std::all_of(sampling.begin(), sampling.end(),
                                  [](const RowSampling& s) { return s.params.greedy; });
  if (greedy) return StepOutputKind::kGreedyIds;
  if (comm.size() > 1 && ShardPickSlotWidth(sampling) != 2)
    return StepOutputKind::kSampledIdsHostPick;
  return StepOutputKind::kSampledIds;
}

Status RankModel::Sum(Collective& comm, Tensor& x) {
  return backend_.IssueStreamWork([&] { return comm.AllReduceSum(x); });
}

Status RankModel::Forward(const StepPlan& step, const KvBlockTables& kv, Collective& comm,
                          StepOutput* out, const PipelineLinks& pipe) {
  const StepRows rows = FlattenStep(step, kv);
  const StepOutputKind kind = OutputKind(step, rows.sampling, comm);
  RETURN_IF_ERROR(backend_.BeginStep(rows.seqs, kind, !rows.row_mask.empty()));

  Activations a = AllocActivations(static_cast<int64_t>(rows.ids.size()));
  RETURN_IF_ERROR(EmbedTokens(rows.ids, comm, pipe, a.x));
  backend_.RmsNorm(a.x, layers_.front().input_norm, eps(), a.normed);
  for (size_t li = 0; li < layers_.size(); ++li) {
    RETURN_IF_ERROR(TransformerLayer(li, rows.seqs, comm, a));
  }
  if (!plan_.last_stage()) return SendToNextStage(a.x, pipe, out);
  return Heads(rows, kind, comm, a.normed, out);
}

RankModel::Activations RankModel::AllocActivations(int64_t tokens) {
  Backend& b = backend_;
  const LayerWeights& w = layers_.front();
  const int64_t h = config_.hidden_size;
  Activations a;
  a.x = b.Alloc(tokens, h);
  a.normed = b.Alloc(tokens, h);
  a.qkv = b.Alloc(tokens, w.qkv.rows);
  a.attn = b.Alloc(tokens, plan_.q_heads() * config_.head_dim);
  a.o = b.Alloc(tokens, h);
  a.gate_up = b.Alloc(tokens, w.gate_up.rows);
  a.act = b.Alloc(tokens, w.gate_up.rows / 2);
  a.down = b.Alloc(tokens, h);
  return a;
}

// Embedding × sqrt(hidden), the normalizer rounded to the activation dtype as the reference does
// (bf16: 68.0 for 27B, not 67.88). Vocab-parallel: each rank fills its rows, then a sum. Later
// pipeline stages receive the residual stream instead (rank 0 of the pair is the earlier stage).
Status RankModel::EmbedTokens(std::span<const int32_t> ids, Collective& comm,
                              const PipelineLinks& pipe, Tensor& x) {
  if (!plan_.first_stage()) {
    if (pipe.prev == nullptr)
      return Internal("pipeline stage " + std::to_string(plan_.stage) + " has no previous stage");
    return backend_.IssueStreamWork([&] { return pipe.prev->RecvFrom(x, 0); });
  }
  float normalizer = static_cast<float>(std::sqrt(static_cast<double>(config_.hidden_size)));
  if (backend_.activation_dtype() == DType::kBF16) normalizer = Bf16ToF32(F32ToBf16(normalizer));
  backend_.Embed(ids, embed_, plan_.vocab_begin, normalizer, x);
  return Sum(comm, x);
}

// Gemma 2's layer: each block's input pre-normed, its output post-normed before the residual add.
// On entry a.normed holds input_layernorm(x); on return, the next layer's (or the final) norm.
Status RankModel::TransformerLayer(size_t li, std::span<const SeqSlice> seqs, Collective& comm,
                                   Activations& a) {
  const LayerWeights& w = layers_[li];
  AttentionBlock(li, seqs, a);
  RETURN_IF_ERROR(SumAddNorm(comm, a.o, w.post_attention_norm, &w.pre_feedforward_norm, a));
  MlpBlock(w, a);
  // The next layer's input norm, the final norm after the last layer, none at a stage boundary.
  const Tensor* next_norm = li + 1 < layers_.size() ? &layers_[li + 1].input_norm
                            : plan_.last_stage()    ? &final_norm_
                                                    : nullptr;
  return SumAddNorm(comm, a.down, w.post_feedforward_norm, next_norm, a);
}

// This rank's heads: q|k|v, RoPE and the cache write, attention, then this rank's share of
// o_proj into a.o (summed across ranks by the caller).
void RankModel::AttentionBlock(size_t li, std::span<const SeqSlice> seqs, Activations& a) {
  const LayerWeights& w = layers_[li];
  const AttentionParams p = AttentionFor(plan_.layer_begin + static_cast<int64_t>(li));
  const auto local_layer = static_cast<int64_t>(li);  // caches index this stage's layers
  backend_.Linear(a.normed, w.qkv, nullptr, a.qkv);
  backend_.RopeAndCacheWrite(a.qkv, seqs, local_layer, p);
  backend_.Attention(a.qkv, seqs, local_layer, p, a.attn);
  backend_.Linear(a.attn, w.o, nullptr, a.o);
}

// down(gelu_tanh(gate(x)) * up(x)) over this rank's columns into a.down.
void RankModel::MlpBlock(const LayerWeights& w, Activations& a) {
  backend_.Linear(a.normed, w.gate_up, nullptr, a.gate_up);
  backend_.GeluTanhMul(a.gate_up, a.act);
  backend_.Linear(a.act, w.down, nullptr, a.down);
}

// A block's output summed across ranks, post-normed into the residual stream, and the next norm
// into a.normed: one op where the backend can (cuda ranks of one host, decode steps).
Status RankModel::SumAddNorm(Collective& comm, Tensor& delta, const Tensor& post_w,
                             const Tensor* next_w, Activations& a) {
  if (backend_.AllReduceAddRmsNorm(a.x, delta, post_w, next_w, eps(), a.normed)) return OkStatus();
  RETURN_IF_ERROR(Sum(comm, delta));
  backend_.AddRmsNorm(a.x, delta, post_w, next_w, eps(), a.normed);
  return OkStatus();
}

Status RankModel::SendToNextStage(Tensor& x, const PipelineLinks& pipe, StepOutput* out) {
  if (pipe.next == nullptr)
    return Internal("pipeline stage " + std::to_string(plan_.stage) + " has no next stage");
  RETURN_IF_ERROR(backend_.IssueStreamWork([&] { return pipe.next->SendTo(x, 1); }));
  RETURN_IF_ERROR(backend_.EndGraphSection());
  out->rows = 0;
  out->width = config_.output_size();
  return OkStatus();
}

// The final-normed rows asked for, through the LM head or the classifier.
Status RankModel::Heads(const StepRows& rows, StepOutputKind kind, Collective& comm,
                        const Tensor& normed, StepOutput* out) {
  const bool ids_only = kind != StepOutputKind::kLogits;
  const int64_t r = static_cast<int64_t>(rows.out_rows.size());
  out->rows = r;
  out->width = config_.output_size();
  out->values.assign(ids_only ? 0 : static_cast<size_t>(r * out->width), 0.0f);
  out->ids.assign(ids_only ? static_cast<size_t>(r) : 0, 0);
  if (r == 0) return OkStatus();
  Tensor sel = backend_.Alloc(r, config_.hidden_size);
  backend_.GatherRows(normed, rows.out_rows, sel);
  if (config_.architecture != Architecture::kCausalLM) {
    // Classifier heads get no softcap; the score matrix is small and replicated.
    Tensor scores = backend_.AllocOutput(r, config_.num_labels);
    backend_.Linear(sel, score_, score_bias_.empty() ? nullptr : &score_bias_, scores);
    return backend_.ToHost(scores, out->values.data());
  }
  return LmHead(sel, rows, kind, comm, out);
}

// Vocab-parallel LM head: this rank's columns of the logits with the final softcap; then the ids
// picked from the shards (on the device, or on the host for top-k / top-p rows across ranks), or
// the full rows assembled by a sum (other ranks contribute zeros there).
Status RankModel::LmHead(const Tensor& sel, const StepRows& rows, StepOutputKind kind,
                         Collective& comm, StepOutput* out) {
  Backend& b = backend_;
  const std::span<const RowSampling> sampling = rows.sampling;
  const int64_t r = sel.rows;
  const int tp = static_cast<int>(comm.size());
  Tensor local = b.AllocOutput(r, lm_head_.rows);
  b.Linear(sel, lm_head_, nullptr, local);
  if (config_.final_logit_softcap > 0)
    b.Softcap(local, static_cast<float>(config_.final_logit_softcap));
  const bool ids_only = kind != StepOutputKind::kLogits;
  // Each rank masks its own columns before any pick: the rows stay on the ids-only path.
  if (ids_only && !rows.row_mask.empty())
    b.MaskTokens(local, rows.masks, rows.row_mask, plan_.vocab_begin);
  if (ids_only && tp > 1 && kind != StepOutputKind::kSampledIdsHostPick) {
    // Each rank's best, summed, decided on the device (inside a decode graph): only ids leave.
    Tensor exchange = b.AllocOutput(r, int64_t{2} * tp);
    b.ShardBestScores(local, sampling, plan_.vocab_begin, comm.rank(), tp, exchange);
    RETURN_IF_ERROR(Sum(comm, exchange));
    return b.ShardPickToHost(exchange, tp, out->ids.data());
  }
  if (kind == StepOutputKind::kSampledIdsHostPick) {
    RETURN_IF_ERROR(b.EndGraphSection());  // the pick copies top-k / top-p candidates to the host
    ASSIGN_OR_RETURN(const bool picked, PickAcrossShards(local, sampling, comm, out));
    if (picked) return OkStatus();
    ++shard_pick_fallbacks_;  // a threshold below what the candidates prove: assemble the rows
  }
  Tensor full = b.AllocOutput(r, config_.vocab_size);
  b.ScatterColumns(local, plan_.vocab_begin, full);
  RETURN_IF_ERROR(Sum(comm, full));
  if (ids_only) return b.SampleToHost(full, sampling, out->ids.data());
  return b.ToHost(full, out->values.data());
}

}  // namespace gemma2
