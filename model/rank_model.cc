#include "model/rank_model.h"

#include <algorithm>
#include <cmath>

#include "common/sampling_noise.h"
#include "model/shard_pick.h"

namespace gemma2 {

Result<int64_t> RankModel::CreateKvPool(int64_t block_size, int64_t blocks) {
  // Caches for this stage's layers only, indexed from the stage's first layer.
  std::vector<KvGroup> groups;
  for (int64_t l = plan_.layer_begin; l < plan_.layer_end; ++l)
    groups.push_back(KvLayout::GroupOf(config_, l));
  return backend_.CreateKvPool(groups, plan_.kv_heads(), config_.head_dim, block_size, blocks);
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

Status RankModel::Forward(const StepPlan& step, const KvBlockTables& kv, Collective& comm,
                          StepOutput* out, const PipelineLinks& pipe) {
  const ModelConfig& c = config_;
  Backend& b = backend_;
  const int64_t t = step.total_tokens(), h = c.hidden_size;
  const float eps = static_cast<float>(c.rms_norm_eps);

  std::vector<int32_t> ids;
  std::vector<SeqSlice> seqs;
  std::vector<int64_t> out_rows;
  std::vector<RowSampling> sampling;  // one per output row
  for (size_t i = 0; i < step.sequences.size(); ++i) {
    const StepSequence& s = step.sequences[i];
    const int64_t row0 = static_cast<int64_t>(ids.size());
    seqs.push_back(
        {{kv.table(s.sequence_id, KvGroup::kFull), kv.table(s.sequence_id, KvGroup::kSliding)},
         s.start_pos,
         static_cast<int64_t>(s.tokens.size()),
         row0});
    ids.insert(ids.end(), s.tokens.begin(), s.tokens.end());
    for (int64_t r : s.output_rows) {
      out_rows.push_back(row0 + r);
      sampling.push_back(s.sampling);
    }
  }

  const bool ids_only = step.ids_only && c.architecture == Architecture::kCausalLM;
  // Collectives are captured with the ops of a graph step; a replay issues them no second time.
  auto sum = [&](Tensor& x) { return b.replaying_graph() ? OkStatus() : comm.AllReduceSum(x); };
  const bool greedy = std::all_of(sampling.begin(), sampling.end(),
                                  [](const RowSampling& s) { return s.params.greedy; });
  // Vocab-parallel picks of greedy / temperature-only rows run on the backend; others on the host.
  const bool host_pick = comm.size() > 1 && ShardPickSlotWidth(sampling) != 2;
  RETURN_IF_ERROR(b.BeginStep(seqs, !ids_only   ? StepOutputKind::kLogits
                                    : greedy    ? StepOutputKind::kGreedyIds
                                    : host_pick ? StepOutputKind::kSampledIdsHostPick
                                                : StepOutputKind::kSampledIds));

  // Embedding × sqrt(hidden), the normalizer rounded to the activation dtype as the reference
  // does (bf16: 68.0 for 27B, not 67.88). Vocab-parallel: each rank fills its rows, then a sum.
  float normalizer = static_cast<float>(std::sqrt(static_cast<double>(h)));
  if (b.activation_dtype() == DType::kBF16) normalizer = Bf16ToF32(F32ToBf16(normalizer));
  Tensor x = b.Alloc(t, h);
  if (plan_.first_stage()) {
    b.Embed(ids, embed_, plan_.vocab_begin, normalizer, x);
    RETURN_IF_ERROR(sum(x));
  } else {
    // The residual stream of the previous stage (its rank 0 of the pair is that stage).
    if (pipe.prev == nullptr)
      return Internal("pipeline stage " + std::to_string(plan_.stage) + " has no previous stage");
    if (!b.replaying_graph()) RETURN_IF_ERROR(pipe.prev->RecvFrom(x, 0));
  }

  // Scratch for one layer, reused by every layer (all layers of a rank have the same shapes).
  const LayerWeights& first = layers_.front();
  Tensor normed = b.Alloc(t, h);
  Tensor qkv = b.Alloc(t, first.qkv.rows);
  Tensor attn = b.Alloc(t, plan_.q_heads() * c.head_dim);
  Tensor o = b.Alloc(t, h);
  Tensor gate_up = b.Alloc(t, first.gate_up.rows);
  Tensor act = b.Alloc(t, first.gate_up.rows / 2);
  Tensor down = b.Alloc(t, h);

  // A block's output summed across ranks, post-normed into the residual stream x, and the next
  // norm into `normed`: one op where the backend can (cuda ranks of one host, decode steps).
  auto sum_add_norm = [&](Tensor& delta, const Tensor& post_w, const Tensor* next_w) -> Status {
    if (b.AllReduceAddRmsNorm(x, delta, post_w, next_w, eps, normed)) return OkStatus();
    RETURN_IF_ERROR(sum(delta));
    b.AddRmsNorm(x, delta, post_w, next_w, eps, normed);
    return OkStatus();
  };

  b.RmsNorm(x, first.input_norm, eps, normed);
  for (size_t li = 0; li < layers_.size(); ++li) {
    const LayerWeights& w = layers_[li];
    const int64_t layer = plan_.layer_begin + static_cast<int64_t>(li);
    const AttentionParams ap = AttentionFor(layer);

    // Attention block: this rank's heads, then a sum of the o_proj partial products.
    b.Linear(normed, w.qkv, nullptr, qkv);
    b.RopeAndCacheWrite(qkv, seqs, static_cast<int64_t>(li), ap);  // caches index local layers
    b.Attention(qkv, seqs, static_cast<int64_t>(li), ap, attn);
    b.Linear(attn, w.o, nullptr, o);
    // Post-attention norm applies to the block output before the residual add.
    RETURN_IF_ERROR(sum_add_norm(o, w.post_attention_norm, &w.pre_feedforward_norm));

    // MLP block: down(gelu_tanh(gate(x)) * up(x)) over this rank's columns, then a sum.
    b.Linear(normed, w.gate_up, nullptr, gate_up);
    b.GeluTanhMul(gate_up, act);
    b.Linear(act, w.down, nullptr, down);
    // The next layer's input norm, the final norm after the last layer, none at a stage boundary.
    const Tensor* next_norm = li + 1 < layers_.size() ? &layers_[li + 1].input_norm
                              : plan_.last_stage()    ? &final_norm_
                                                      : nullptr;
    RETURN_IF_ERROR(sum_add_norm(down, w.post_feedforward_norm, next_norm));
  }
  if (!plan_.last_stage()) {
    if (pipe.next == nullptr)
      return Internal("pipeline stage " + std::to_string(plan_.stage) + " has no next stage");
    if (!b.replaying_graph()) RETURN_IF_ERROR(pipe.next->SendTo(x, 1));
    RETURN_IF_ERROR(b.EndGraphSection());
    out->rows = 0;
    out->width = c.output_size();
    return OkStatus();
  }

  // `normed` now holds the final-normed hidden states. Project only the rows asked for.
  const int64_t r = static_cast<int64_t>(out_rows.size());
  out->rows = r;
  out->width = c.output_size();
  out->values.assign(ids_only ? 0 : static_cast<size_t>(r * out->width), 0.0f);
  out->ids.assign(ids_only ? static_cast<size_t>(r) : 0, 0);
  if (r == 0) return OkStatus();
  Tensor sel = b.Alloc(r, h);
  b.GatherRows(normed, out_rows, sel);
  if (c.architecture == Architecture::kCausalLM) {
    // Vocab-parallel LM head: this rank's columns of the logits, final softcap, then a sum that
    // assembles the full rows (other ranks contribute zeros there).
    Tensor local = b.AllocOutput(r, lm_head_.rows);
    const int tp_size = static_cast<int>(comm.size());
    b.Linear(sel, lm_head_, nullptr, local);
    if (c.final_logit_softcap > 0) b.Softcap(local, static_cast<float>(c.final_logit_softcap));
    if (ids_only && comm.size() > 1 && !host_pick) {
      // Greedy / temperature-only rows: each rank's best, summed, decided on the device (inside
      // a decode graph); only the ids leave.
      Tensor exchange = b.AllocOutput(r, 2 * tp_size);
      b.ShardBestScores(local, sampling, plan_.vocab_begin, comm.rank(), tp_size, exchange);
      RETURN_IF_ERROR(sum(exchange));
      return b.ShardPickToHost(exchange, tp_size, out->ids.data());
    }
    if (ids_only && host_pick) {
      RETURN_IF_ERROR(b.EndGraphSection());  // the pick copies top-k / top-p candidates to the host
      ASSIGN_OR_RETURN(const bool picked, PickAcrossShards(local, sampling, comm, out));
      if (picked) return OkStatus();
      ++shard_pick_fallbacks_;  // a threshold below what the candidates prove: assemble the rows
    }
    Tensor full = b.AllocOutput(r, c.vocab_size);
    b.ScatterColumns(local, plan_.vocab_begin, full);
    RETURN_IF_ERROR(sum(full));
    if (ids_only) {
      RETURN_IF_ERROR(b.SampleToHost(full, sampling, out->ids.data()));
    } else {
      RETURN_IF_ERROR(b.ToHost(full, out->values.data()));
    }
  } else {
    // Classifier heads get no softcap; the score matrix is small and replicated.
    Tensor scores = b.AllocOutput(r, c.num_labels);
    b.Linear(sel, score_, score_bias_.empty() ? nullptr : &score_bias_, scores);
    RETURN_IF_ERROR(b.ToHost(scores, out->values.data()));
  }
  return OkStatus();
}

}  // namespace gemma2
