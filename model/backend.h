// The fused ops a backend implements. The forward pass (RankModel::Forward, model/rank_model.cc) is written once against
// this interface; the cpu backend (fp32) is the specification of every other backend's ops.
// Contract for all ops: tensors are row-major, activations are [tokens, features]; shapes are
// checked by the caller (the forward pass); ops run on the backend's own stream, in order.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"
#include "common/tensor.h"
#include "model/kv_blocks.h"
#include "model/quantization.h"
#include "model/sampling.h"
#include "model/step.h"

namespace gemma2 {

// One sequence's part of a step: rows [row_begin, row_begin + num_tokens) of the activations are
// its new tokens at positions start_pos, start_pos + 1, ...; its KV cache already holds positions
// [0, start_pos) (sliding-window layers: those a query of this step can see) in the blocks its
// tables name (model/kv_blocks.h), and the blocks for the new positions are mapped too.
struct SeqSlice {
  std::array<std::span<const int32_t>, kKvGroups> blocks;  // per KvGroup: logical -> physical
  int64_t start_pos = 0;
  int64_t num_tokens = 0;
  int64_t row_begin = 0;
};

// BeginStep's check, for every backend: each new position of each sequence lies in a mapped
// block below `blocks` of each group the local layers use.
inline Status CheckNewPositionsMapped(std::span<const SeqSlice> seqs,
                                      std::span<const KvGroup> layer_groups, int64_t block_size,
                                      int64_t blocks) {
  std::array<bool, kKvGroups> used{};
  for (KvGroup g : layer_groups) used[static_cast<size_t>(g)] = true;
  for (size_t i = 0; i < seqs.size(); ++i) {
    const SeqSlice& s = seqs[i];
    for (int g = 0; g < kKvGroups; ++g) {
      if (!used[static_cast<size_t>(g)]) continue;
      const std::span<const int32_t> t = s.blocks[static_cast<size_t>(g)];
      for (int64_t b = s.start_pos / block_size;
           b <= (s.start_pos + s.num_tokens - 1) / block_size && s.num_tokens > 0; ++b) {
        if (b >= static_cast<int64_t>(t.size()) || t[static_cast<size_t>(b)] < 0 ||
            t[static_cast<size_t>(b)] >= blocks) {
          return InvalidArgument("step sequence " + std::to_string(i) + ": logical KV block " +
                                 std::to_string(b) + " of group " + std::to_string(g) +
                                 " is not mapped");
        }
      }
    }
  }
  return OkStatus();
}

struct AttentionParams {
  int64_t q_heads = 0;   // this rank's query heads
  int64_t kv_heads = 0;  // this rank's kv heads; q head h reads kv head h / (q_heads / kv_heads)
  int64_t head_dim = 0;
  float scale = 0;     // query_pre_attn_scalar ^ -0.5
  float softcap = 0;   // 0: none; else scores = tanh(scores / softcap) * softcap
  int64_t window = 0;  // 0: full causal; else key k visible from query q iff q - window < k <= q
  double rope_theta = 10000;
};

// How a step's outputs leave the backend: logits rows (ToHost) or only token ids (SampleToHost,
// ShardPickToHost), all greedy or some sampled; kSampledIdsHostPick: tensor parallel with a
// top-k / top-p row, whose pick runs on the host after the graph section ends. A backend keeps
// its decode graphs per kind, so a graph replays the ops it captured (with or without the pick).
enum class StepOutputKind : uint8_t { kLogits, kGreedyIds, kSampledIds, kSampledIdsHostPick };

// Publishes this rank's bytes under `key` and returns every rank's, in rank order: a rendezvous
// of a tensor-parallel group that the caller provides (the workers' control-plane store).
using PeerExchange = std::function<Result<std::vector<std::string>>(const std::string& key,
                                                                    const std::string& mine)>;

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string_view name() const = 0;
  // The stream the ops run on (cudaStream_t on cuda; null on cpu): where a GPU collective enqueues.
  virtual void* native_stream() { return nullptr; }
  // Readies the calling thread to run this backend's ops (cuda: selects the backend's device,
  // a per-thread setting). A thread other than the creating one calls it before its first op.
  virtual Status BindThread() { return OkStatus(); }
  // Work of a step that is not one of the ops below (a collective between ranks, a pipeline send
  // or receive), issued in the step's order: at once, or into a decode graph being captured; a
  // backend replaying a captured step skips it (the graph holds it already).
  virtual Status IssueStreamWork(const std::function<Status()>& work) { return work(); }
  // Ops after this run eagerly: a capture in progress ends here and what it holds is launched.
  // Called before work a graph cannot hold (copies to the host mid-step) and where a stage ends.
  virtual Status EndGraphSection() { return OkStatus(); }
  // The dtype the loader should hand this backend's weights in.
  virtual DType weight_dtype() const = 0;
  // The dtype activations live in between ops (fp32 on cpu, bf16 on cuda).
  virtual DType activation_dtype() const = 0;

  // --- memory ---
  // Copies a weight to the backend in weight_dtype(); fails (e.g. out of memory) with a Status.
  virtual Result<Tensor> Upload(const void* host, DType dtype, int64_t rows, int64_t cols) = 0;
  // Writes rows [row_begin, row_end) of a weight, dense and row-major, into dst. May be called
  // from several threads at once, for disjoint row ranges.
  using RowFiller = std::function<Status(int64_t row_begin, int64_t row_end, void* dst)>;
  // Like Upload, but `fill` writes the weight (rows x cols of `dtype`) in row ranges into memory
  // the backend picks: cuda hands out pinned staging buffers whose copies to the device overlap the
  // next fill. The weight may still be in flight on return; FinishUploads waits for all of them.
  virtual Result<Tensor> UploadRows(DType dtype, int64_t rows, int64_t cols,
                                    const RowFiller& fill) {
    std::unique_ptr<uint8_t[]> host(
        new uint8_t[static_cast<size_t>(rows * cols * DTypeSize(dtype))]);
    RETURN_IF_ERROR(fill(0, rows, host.get()));
    return Upload(host.get(), dtype, rows, cols);
  }
  // Replaces a projection weight, as uploaded, by its FP8 form (model/quantization.h): cuda keeps
  // E4M3 bytes and row scales (kF8E4M3, row_scales); cpu, the specification, keeps fp32 holding
  // exactly the dequantized values. Called once per weight while loading, after its upload.
  virtual Status QuantizeFp8(Tensor& w) = 0;
  // Waits until every weight of UploadRows is in place and frees what uploading held; reports
  // the first failure among them. Loading calls it once, before the first step.
  virtual Status FinishUploads() { return OkStatus(); }
  // Scratch for this step, valid until the next BeginStep; contents undefined.
  virtual Tensor Alloc(int64_t rows, int64_t cols) = 0;        // activation dtype
  virtual Tensor AllocOutput(int64_t rows, int64_t cols) = 0;  // fp32: logits and scores
  // An fp32 output tensor holding `host` (small exchanges between ranks; not inside graphs).
  virtual Result<Tensor> OutputFromHost(const float* host, int64_t rows, int64_t cols) = 0;
  // Waits for the step's work and copies `t` to the host as fp32. Reports the first error of any
  // op since BeginStep (ops themselves return nothing: their failures are sticky until here).
  virtual Status ToHost(const Tensor& t, float* host) = 0;
  // Like ToHost, but only one sampled token per row of an fp32 logits tensor leaves: row r as
  // SampleRow(row r, rows[r]) specifies (model/sampling.h).
  virtual Status SampleToHost(const Tensor& logits, std::span<const RowSampling> rows,
                              int32_t* ids) = 0;
  // Starts a step over `seqs`: resets scratch and stages per-token metadata and the block tables
  // for the ops. Fails (nothing run) on a table that does not map a new position.
  // `output`: how the step will end (a backend may replay id-only decode steps as captured graphs);
  // `masked`: the step limits rows to token masks (MaskTokens); graphs are kept per both.
  virtual Status BeginStep(std::span<const SeqSlice> seqs, StepOutputKind output, bool masked) = 0;

  // --- the paged KV cache ---
  // Creates the pool, once, before the first step: local layer l (of this rank's stage) belongs
  // to group layer_groups[l]; a block holds `block_size` positions of one group's layers.
  // `blocks` > 0: that many; 0: as many as the backend's memory allows (cuda: most of what is
  // free then). Returns the number of blocks (every id below it is valid in a table). `dtype`:
  // the cache's element type (model/quantization.h; kFp8: keys and values rounded through E4M3
  // with a scale per position and kv head as they are written).
  virtual Result<int64_t> CreateKvPool(std::span<const KvGroup> layer_groups, int64_t kv_heads,
                                       int64_t head_dim, int64_t block_size, int64_t blocks,
                                       KvCacheDtype dtype) = 0;
  // Block to[i] receives the contents of block from[i] (every layer of the block), in stream order.
  virtual Status CopyKvBlocks(std::span<const int32_t> from, std::span<const int32_t> to) = 0;

  // --- ops ---
  // out[i] = table[ids[i] - vocab_begin] * scale for ids inside this rank's rows, else 0.
  // `scale` is sqrt(hidden) already rounded to the activation dtype.
  virtual void Embed(std::span<const int32_t> ids, const Tensor& table, int64_t vocab_begin,
                     float scale, Tensor& out) = 0;
  // out = x / sqrt(mean(x^2) + eps) * (1 + w), in fp32.
  virtual void RmsNorm(const Tensor& x, const Tensor& w, float eps, Tensor& out) = 0;
  // residual += RmsNorm(delta, post_w); then, if next_w: normed = RmsNorm(residual, next_w).
  virtual void AddRmsNorm(Tensor& residual, const Tensor& delta, const Tensor& post_w,
                          const Tensor* next_w, float eps, Tensor& normed) = 0;
  // out = x · wᵀ (+ bias); w is [out_features, in_features] as Hugging Face stores it. `out` is an
  // activation (Alloc) or an fp32 output (AllocOutput); accumulation is fp32 either way.
  virtual void Linear(const Tensor& x, const Tensor& w, const Tensor* bias, Tensor& out) = 0;
  // qkv rows are [q (q_heads*hd) | k (kv_heads*hd) | v (kv_heads*hd)]. Rotates q and k in place
  // (rotate-half RoPE at each token's position) and appends k, v to each sequence's cache. With an
  // FP8 cache, k and v in the rows become what the cache gives back (rounded through E4M3).
  virtual void RopeAndCacheWrite(Tensor& qkv, std::span<const SeqSlice> seqs, int64_t layer,
                                 const AttentionParams& p) = 0;
  // Causal attention of each new token over its sequence's cache; out is [tokens, q_heads*hd].
  virtual void Attention(const Tensor& qkv, std::span<const SeqSlice> seqs, int64_t layer,
                         const AttentionParams& p, Tensor& out) = 0;
  // gate_up rows are [gate (n) | up (n)]; out = gelu_tanh(gate) * up, [tokens, n].
  virtual void GeluTanhMul(const Tensor& gate_up, Tensor& out) = 0;
  // x = tanh(x / cap) * cap, on an fp32 output tensor.
  virtual void Softcap(Tensor& x, float cap) = 0;
  // Structured output: every column of `logits` (fp32 [rows, cols]: this rank's vocabulary
  // columns, token ids from vocab_begin) whose token row r's mask leaves out becomes -inf.
  // `masks`: the step's TokenMaskWords (model/step.h) over the whole vocabulary; row r follows
  // masks[row_mask[r]], or none where row_mask[r] is -1.
  virtual void MaskTokens(Tensor& logits, std::span<const TokenMaskWords> masks,
                          std::span<const int32_t> row_mask, int64_t vocab_begin) = 0;
  // out[i] = x[rows[i]].
  virtual void GatherRows(const Tensor& x, std::span<const int64_t> rows, Tensor& out) = 0;
  // dst = 0, then dst[:, col_offset : col_offset + src.cols] = src (fp32 output tensors).
  virtual void ScatterColumns(const Tensor& src, int64_t col_offset, Tensor& dst) = 0;

  // --- the sum across tensor-parallel ranks fused with the residual step (cuda, one host) ---
  // Sets up the fused path for this rank of a group of `size` (rows of `hidden`); every rank calls
  // it alike, before the first sequence.
  // kUnavailable (every rank alike) where the ranks cannot share memory: the fused op then
  // declines and the model sums through its Collective.
  virtual Status ConnectPeers(int rank, int size, int64_t hidden, const PeerExchange& exchange) {
    return Status(StatusCode::kUnavailable, "this backend has no peer all-reduce");
  }
  // AddRmsNorm(residual, sum over the group's ranks of delta, ...) in one op; false (nothing done)
  // when this backend cannot for this step (no peers, too many rows), on every rank alike.
  virtual bool AllReduceAddRmsNorm(Tensor& residual, const Tensor& delta, const Tensor& post_w,
                                   const Tensor* next_w, float eps, Tensor& normed) {
    return false;
  }

  // --- the vocab-parallel pick (model/shard_pick.h), rows greedy or temperature-only ---
  // exchange [rows, tp * 2] = FillShardPick of `local` (this rank's softcapped logits columns,
  // global ids from vocab_begin) with slot width 2: zeros but this rank's [best score, id].
  virtual void ShardBestScores(const Tensor& local, std::span<const RowSampling> rows,
                               int64_t vocab_begin, int rank, int tp, Tensor& exchange) = 0;
  // After the exchange is summed across ranks: ids as DecideShardBest gives them; like
  // SampleToHost, only the ids leave the device.
  virtual Status ShardPickToHost(const Tensor& exchange, int tp, int32_t* ids) = 0;
};

}  // namespace gemma2
