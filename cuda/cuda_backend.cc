#include "cuda/cuda_backend.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <optional>
#include <string_view>
#include <vector>

#include "common/cuda_check.h"
#include "cuda/device_memory.h"
#include "cuda/graph_runner.h"
#include "cuda/kv_pool.h"
#include "cuda/peer_group.h"
#include "cuda/scratch_arena.h"
#include "cuda/sticky_status.h"
#include "cuda/weight_stager.h"
#include "kernels/attention.h"
#include "kernels/elementwise.h"
#include "kernels/embed.h"
#include "kernels/flash_attention.h"
#include "kernels/fp8.h"
#include "kernels/gemm.h"
#include "kernels/gemv.h"
#include "kernels/prefill_attention.h"
#include "kernels/rms_norm.h"
#include "kernels/rope_kv.h"
#include "kernels/sample.h"
#include "kernels/shard_pick.h"
#include "model/rope.h"

namespace gemma2 {
namespace {

using kernels::bf16;

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(const CudaOptions& o) : opts_(o) {}
  ~CudaBackend() override {
    if (stream_) cudaStreamSynchronize(stream_);
    graphs_.reset();
    gemm_.reset();
    stager_.reset();
    if (stream_) cudaStreamDestroy(stream_);
  }

  Status Init() {
    RETURN_IF_CUDA_ERROR(cudaSetDevice(opts_.device));
    RETURN_IF_CUDA_ERROR(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    ASSIGN_OR_RETURN(gemm_, kernels::Gemm::Create(stream_));
    ASSIGN_OR_RETURN(pinned_, PinnedStaging::Create(size_t{64} << 20));
    graphs_ = std::make_unique<GraphRunner>(stream_);
    const size_t arrival_bytes = kernels::kSkinnyFp8MaxSplitGroups * sizeof(unsigned);
    ASSIGN_OR_RETURN(skinny_arrivals_, DeviceAlloc(arrival_bytes));
    RETURN_IF_CUDA_ERROR(cudaMemset(skinny_arrivals_.get(), 0, arrival_bytes));
    // GEMMA2_FP8_SKINNY=0 sends 9..16-token FP8 products to cuBLASLt (for A/B measurements).
    const char* skinny = std::getenv("GEMMA2_FP8_SKINNY");
    skinny_fp8_ = !skinny || std::string_view(skinny) != "0";
    return OkStatus();
  }

  std::string_view name() const override { return "cuda"; }
  Status BindThread() override {
    RETURN_IF_CUDA_ERROR(cudaSetDevice(opts_.device));
    return OkStatus();
  }
  DType weight_dtype() const override { return DType::kBF16; }
  DType activation_dtype() const override { return DType::kBF16; }

  Result<Tensor> Upload(const void* host, DType dtype, int64_t rows, int64_t cols) override {
    ASSIGN_OR_RETURN(Tensor t, NewWeight(rows, cols));
    const size_t bytes = static_cast<size_t>(rows * cols) * 2;
    if (dtype == DType::kBF16) {
      RETURN_IF_CUDA_ERROR(cudaMemcpy(t.data, host, bytes, cudaMemcpyHostToDevice));
    } else {
      std::vector<float> f(static_cast<size_t>(rows * cols));
      ConvertToF32(dtype, host, f.data(), rows * cols);
      std::vector<uint16_t> b(f.size());
      for (size_t i = 0; i < f.size(); ++i) b[i] = F32ToBf16(f[i]);
      RETURN_IF_CUDA_ERROR(cudaMemcpy(t.data, b.data(), bytes, cudaMemcpyHostToDevice));
    }
    return t;
  }

  Result<Tensor> UploadRows(DType dtype, int64_t rows, int64_t cols,
                            const RowFiller& fill) override {
    if (dtype != DType::kBF16) return Backend::UploadRows(dtype, rows, cols, fill);
    ASSIGN_OR_RETURN(Tensor t, NewWeight(rows, cols));
    if (!stager_) {
      ASSIGN_OR_RETURN(stager_, WeightStager::Create());
    }
    RETURN_IF_ERROR(stager_->Copy(t.data, rows, cols * 2, fill));
    return t;
  }

  Status QuantizeFp8(Tensor& w) override {
    if (w.dtype != DType::kBF16) return Internal("cuda backend: QuantizeFp8 of a non-bf16 weight");
    if (stager_) RETURN_IF_ERROR(stager_->Finish());  // the weight's copies have landed
    const std::string what =
        "quantizing a " + std::to_string(w.rows) + "x" + std::to_string(w.cols) + " weight to FP8";
    Tensor q;
    q.rows = w.rows;
    q.cols = w.cols;
    q.dtype = DType::kF8E4M3;
    Result<std::shared_ptr<void>> bytes = DeviceAlloc(static_cast<size_t>(w.numel()));
    RETURN_IF_ERROR(bytes.status().WithContext(what));
    Result<std::shared_ptr<void>> scales = DeviceAlloc(static_cast<size_t>(w.rows) * sizeof(float));
    RETURN_IF_ERROR(scales.status().WithContext(what));
    q.storage = std::move(*bytes);
    q.scale_storage = std::move(*scales);
    q.data = q.storage.get();
    q.row_scales = static_cast<float*>(q.scale_storage.get());
    RETURN_IF_CUDA_ERROR(kernels::QuantizeRowsFp8(w.as<bf16>(), w.rows, w.cols, q.as<uint8_t>(),
                                                  q.row_scales, stream_));
    RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(stream_));  // before the bf16 weight is freed
    w = std::move(q);
    return OkStatus();
  }

  Status FinishUploads() override {
    if (!stager_) return OkStatus();
    Status st = stager_->Finish();
    stager_.reset();
    return st;
  }

  Tensor Alloc(int64_t rows, int64_t cols) override { return Scratch(rows, cols, DType::kBF16); }
  Tensor AllocOutput(int64_t rows, int64_t cols) override {
    return Scratch(rows, cols, DType::kF32);
  }
  Result<Tensor> OutputFromHost(const float* host, int64_t rows, int64_t cols) override {
    if (graphs_->in_graph()) return Internal("cuda backend: OutputFromHost inside a graph step");
    Tensor t = Scratch(rows, cols, DType::kF32);
    RETURN_IF_ERROR(errors_.status());
    RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(t.data, host, static_cast<size_t>(rows * cols) * 4,
                                         cudaMemcpyHostToDevice, stream_));
    RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(stream_));
    return t;
  }

  Status ToHost(const Tensor& t, float* host) override {
    if (graphs_->in_graph()) return Internal("cuda backend: ToHost inside a graph step");
    errors_.Note(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    RETURN_IF_ERROR(errors_.status());
    const size_t n = static_cast<size_t>(t.numel());
    if (t.dtype == DType::kF32) {
      RETURN_IF_CUDA_ERROR(cudaMemcpy(host, t.data, n * 4, cudaMemcpyDeviceToHost));
    } else {
      std::vector<uint16_t> b(n);
      RETURN_IF_CUDA_ERROR(cudaMemcpy(b.data(), t.data, n * 2, cudaMemcpyDeviceToHost));
      for (size_t i = 0; i < n; ++i) host[i] = Bf16ToF32(b[i]);
    }
    return OkStatus();
  }

  Status SampleToHost(const Tensor& logits, std::span<const RowSampling> rows,
                      int32_t* ids) override {
    Tensor d = Scratch(1, logits.rows, DType::kI32);
    const bool greedy =
        std::all_of(rows.begin(), rows.end(), [](const RowSampling& r) { return r.params.greedy; });
    const bool sampled_kind =
        output_ == StepOutputKind::kSampledIds || output_ == StepOutputKind::kSampledIdsHostPick;
    if (greedy == sampled_kind) {
      return Internal("cuda backend: SampleToHost disagrees with the step's output kind");
    }
    if (greedy) {  // the two-pass argmax is faster than a sampling block per row
      const Tensor scratch = Scratch(
          1, static_cast<int64_t>(kernels::ArgmaxScratchBytes(logits.rows) / 4), DType::kF32);
      Launch("ArgmaxRows", [&] {
        return kernels::ArgmaxRows(logits.as<float>(), logits.rows, logits.cols, scratch.data,
                                   d.as<int32_t>(), stream_);
      });
    } else {
      const Tensor params = StageSampling(rows);
      const Tensor scratch = Scratch(
          1, static_cast<int64_t>(kernels::SampleScratchBytes(logits.rows, logits.cols) / 4),
          DType::kF32);
      Launch("SampleRows", [&] {
        return kernels::SampleRows(logits.as<float>(), logits.rows, logits.cols,
                                   static_cast<const kernels::DeviceSampling*>(params.data),
                                   scratch.data, d.as<int32_t>(), stream_);
      });
    }
    return IdsToHost(d, ids);
  }

  Status ConnectPeers(int rank, int size, int64_t hidden, const PeerExchange& exchange) override {
    if (!pool_ && !peers_) {
      ASSIGN_OR_RETURN(peers_,
                       PeerGroup::Create(rank, size, opts_.peer_max_rows, hidden, exchange));
      return OkStatus();
    }
    return Internal("cuda backend: ConnectPeers after the KV cache or twice");
  }

  bool AllReduceAddRmsNorm(Tensor& residual, const Tensor& delta, const Tensor& post_w,
                           const Tensor* next_w, float eps, Tensor& normed) override {
    if (!peers_ || delta.rows > peers_->view().max_rows || delta.cols != peers_->view().hidden)
      return false;
    Launch("PeerAllReduceAddRmsNorm", [&] {
      return kernels::PeerAllReduceAddRmsNorm(
          peers_->view(), residual.as<bf16>(), delta.as<bf16>(), post_w.as<bf16>(),
          next_w ? next_w->as<bf16>() : nullptr, delta.rows, eps, normed.as<bf16>(),
          static_cast<uint64_t>(opts_.peer_timeout_s) * 1000000000ull, stream_);
    });
    return true;
  }

  void ShardBestScores(const Tensor& local, std::span<const RowSampling> rows, int64_t vocab_begin,
                       int rank, int tp, Tensor& exchange) override {
    const Tensor params = StageSampling(rows);
    const Tensor scratch = Scratch(
        1, static_cast<int64_t>(kernels::ShardBestScratchBytes(local.rows) / 4), DType::kF32);
    Launch("ShardBestRows", [&] {
      return kernels::ShardBestRows(local.as<float>(), local.rows, local.cols, vocab_begin,
                                    static_cast<const kernels::DeviceSampling*>(params.data), rank,
                                    tp, scratch.data, exchange.as<float>(), stream_);
    });
  }

  Status ShardPickToHost(const Tensor& exchange, int tp, int32_t* ids) override {
    Tensor d = Scratch(1, exchange.rows, DType::kI32);
    Launch("DecideShardRows", [&] {
      return kernels::DecideShardRows(exchange.as<float>(), exchange.rows, tp, d.as<int32_t>(),
                                      stream_);
    });
    return IdsToHost(d, ids);
  }

  void* native_stream() override { return stream_; }
  Status IssueStreamWork(const std::function<Status()>& work) override {
    Status st;
    graphs_->Launch([&] { st = work(); });
    return st;
  }
  Status EndGraphSection() override { return graphs_->EndSection(errors_.status()); }

  // One kernel over every pair and layer slot, on the step stream (ordered before the next
  // step's kernels). Between steps only: never inside a captured one.
  Status CopyKvBlocks(std::span<const int32_t> from, std::span<const int32_t> to) override {
    if (!pool_) return Internal("cuda backend: no KV pool");
    if (graphs_->in_graph()) return Internal("cuda backend: CopyKvBlocks inside a graph step");
    errors_.Note(pool_->CopyBlocks(from, to, stream_));
    return errors_.status();
  }

  Result<int64_t> CreateKvPool(std::span<const KvGroup> layer_groups, int64_t kv_heads,
                               int64_t head_dim, int64_t block_size, int64_t blocks,
                               KvCacheDtype dtype) override {
    if (pool_) return Internal("cuda backend: the KV pool exists already");
    KvPoolShape shape;
    shape.kv_heads = kv_heads;
    shape.head_dim = head_dim;
    shape.block_size = block_size;
    shape.max_positions = opts_.max_positions;
    shape.fp8 = dtype == KvCacheDtype::kFp8;
    ASSIGN_OR_RETURN(pool_, KvPool::Create(layer_groups, shape, blocks, opts_.kv_cache_bytes));
    return pool_->num_blocks();
  }

  Status BeginStep(std::span<const SeqSlice> seqs, StepOutputKind output, bool masked) override {
    output_ = output;
    errors_.Note(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    RETURN_IF_ERROR(errors_.status());
    arena_.Reset();
    pinned_.Reset();
    attn_partial_ = Tensor{};
    if (!seqs.empty()) {
      if (!pool_) return Internal("cuda backend: no KV pool");
      RETURN_IF_ERROR(
          CheckNewPositionsMapped(seqs, pool_->groups(), pool_->block_size(), pool_->num_blocks()));
    }
    // Block tables have a fixed stride (a sequence's most blocks), so every kernel argument of a
    // decode step depends only on its batch size: such steps are captured once and replayed.
    // Staged as [group][sequence][logical block]; unmapped entries (-1) are never read.
    const size_t max_blocks = pool_ ? static_cast<size_t>(pool_->max_blocks()) : 0;
    std::vector<int32_t>& token_seq = host_token_seq_;  // host buffers kept across steps
    std::vector<int32_t>& token_pos = host_token_pos_;
    std::vector<int32_t>& tables = host_tables_;
    token_seq.clear();
    token_pos.clear();
    tables.assign(kKvGroups * seqs.size() * max_blocks, -1);
    max_context_ = 0;
    for (size_t s = 0; s < seqs.size(); ++s) {
      max_context_ = std::max(max_context_, seqs[s].start_pos + seqs[s].num_tokens);
      for (int64_t t = 0; t < seqs[s].num_tokens; ++t) {
        token_seq.push_back(static_cast<int32_t>(s));
        token_pos.push_back(static_cast<int32_t>(seqs[s].start_pos + t));
      }
      for (size_t g = 0; g < kKvGroups; ++g) {
        const std::span<const int32_t> b = seqs[s].blocks[g];
        if (b.size() > max_blocks) return InvalidArgument("a KV block table is too long");
        std::copy(b.begin(), b.end(),
                  tables.begin() + static_cast<std::ptrdiff_t>((g * seqs.size() + s) * max_blocks));
      }
    }
    tables_per_group_ = seqs.size() * max_blocks;
    step_tokens_.count = static_cast<int64_t>(token_seq.size());
    const bool decode = output != StepOutputKind::kLogits && opts_.cuda_graphs && !seqs.empty() &&
                        step_tokens_.count == static_cast<int64_t>(seqs.size());
    // A decode graph holds attention's split count, which follows the context's bucket.
    std::optional<GraphRunner::Key> key;
    if (decode)
      key.emplace(seqs.size(), output, kernels::AttentionContextBucket(max_context_), masked);
    RETURN_IF_ERROR(graphs_->Begin(key));
    step_tokens_.token_seq = Stage(token_seq.data(), token_seq.size() * 4).as<int32_t>();
    step_tokens_.token_pos = Stage(token_pos.data(), token_pos.size() * 4).as<int32_t>();
    block_tables_ = Stage(tables.data(), tables.size() * 4).as<int32_t>();
    return errors_.status();
  }

  void Embed(std::span<const int32_t> ids, const Tensor& table, int64_t vocab_begin, float scale,
             Tensor& out) override {
    const Tensor d = Stage(ids.data(), ids.size() * 4);
    Launch("Embed", [&] {
      return kernels::Embed(d.as<int32_t>(), static_cast<int64_t>(ids.size()), table.as<bf16>(),
                            table.rows, table.cols, vocab_begin, scale, out.as<bf16>(), stream_);
    });
  }

  void RmsNorm(const Tensor& x, const Tensor& w, float eps, Tensor& out) override {
    Launch("RmsNorm", [&] {
      return kernels::RmsNorm(x.as<bf16>(), w.as<bf16>(), x.rows, x.cols, eps, out.as<bf16>(),
                              stream_);
    });
  }

  void AddRmsNorm(Tensor& residual, const Tensor& delta, const Tensor& post_w, const Tensor* next_w,
                  float eps, Tensor& normed) override {
    Launch("AddRmsNorm", [&] {
      return kernels::AddRmsNorm(residual.as<bf16>(), delta.as<bf16>(), post_w.as<bf16>(),
                                 next_w ? next_w->as<bf16>() : nullptr, residual.rows,
                                 residual.cols, eps, normed.as<bf16>(), stream_);
    });
  }

  void Linear(const Tensor& x, const Tensor& w, const Tensor* bias, Tensor& out) override {
    if (!errors_.ok()) return;
    const bool f32 = out.dtype == DType::kF32;
    if (w.dtype == DType::kF8E4M3) {
      LinearFp8(x, w, out, f32);
    } else if (kernels::GemvSupports(x.data, w.data, x.rows, x.cols)) {  // decode: memory-bound
      Launch("Gemv", [&] {
        return kernels::Gemv(x.as<bf16>(), w.as<bf16>(), out.data, f32, x.rows, w.rows, x.cols,
                             stream_);
      });
    } else {
      Launch("GEMM", [&] { return gemm_->Run(x.data, w.data, out.data, f32, x.rows, w.rows, x.cols); });
    }
    if (bias) {
      Launch("AddBias", [&] {
        return kernels::AddBias(out.data, f32, bias->as<bf16>(), out.rows, out.cols, stream_);
      });
    }
  }

  void RopeAndCacheWrite(Tensor& qkv, std::span<const SeqSlice>, int64_t layer,
                         const AttentionParams& p) override {
    const float* inv_freq = InvFreq(p);
    Launch("RopeAndCacheWrite", [&] {
      return kernels::RopeAndCacheWrite(qkv.as<bf16>(), qkv.cols, step_tokens_,
                                        static_cast<int32_t>(p.q_heads),
                                        static_cast<int32_t>(p.kv_heads),
                                        static_cast<int32_t>(p.head_dim), inv_freq, Kv(layer),
                                        stream_);
    });
  }

  void Attention(const Tensor& qkv, std::span<const SeqSlice> seqs, int64_t layer,
                 const AttentionParams& p, Tensor& out) override {
    if (FreshPrefill(seqs)) {
      PrefillAttention(qkv, seqs, p, out);
      return;
    }
    kernels::AttentionShape s;
    s.q_heads = static_cast<int32_t>(p.q_heads);
    s.kv_heads = static_cast<int32_t>(p.kv_heads);
    s.head_dim = static_cast<int32_t>(p.head_dim);
    s.scale = p.scale;
    s.softcap = p.softcap;
    s.window = static_cast<int32_t>(p.window);
    // One buffer per step: the layers run one after another on the stream.
    const size_t partial_bytes =
        kernels::AttentionPartialBytes(step_tokens_.count, s, max_context_);
    if (partial_bytes > 0 &&
        (attn_partial_.empty() || static_cast<size_t>(attn_partial_.numel()) * 4 < partial_bytes)) {
      attn_partial_ = Scratch(1, static_cast<int64_t>(partial_bytes / 4), DType::kF32);
    }
    const Tensor& partial = attn_partial_;
    Launch("PagedAttention", [&]() -> Status {
      const cudaError_t e =
          kernels::PagedAttention(qkv.as<bf16>(), qkv.cols, step_tokens_, max_context_, s,
                                  Kv(layer), partial.as<float>(), out.as<bf16>(), stream_);
      if (e == cudaErrorInvalidValue) {
        return Unimplemented("cuda attention supports head_dim 128 and 256, not " +
                             std::to_string(p.head_dim));
      }
      return cuda_detail::Check(e, "PagedAttention", __FILE__, __LINE__);
    });
  }

  void GeluTanhMul(const Tensor& gate_up, Tensor& out) override {
    Launch("GeluTanhMul", [&] {
      return kernels::GeluTanhMul(gate_up.as<bf16>(), out.rows, out.cols, out.as<bf16>(), stream_);
    });
  }

  void Softcap(Tensor& x, float cap) override {
    Launch("Softcap", [&] { return kernels::Softcap(x.as<float>(), x.numel(), cap, stream_); });
  }

  // Only this rank's window of each mask a row names goes to the device, in slots taken in row
  // order; a graph step stages the same bytes every time (rows slots and rows indices, fixed by
  // the batch and the shard), whatever the number of distinct masks.
  void MaskTokens(Tensor& logits, std::span<const TokenMaskWords> masks,
                  std::span<const int32_t> row_mask, int64_t vocab_begin) override {
    const int64_t rows = logits.rows;
    const auto words = static_cast<int64_t>(masks.front().size());
    const int64_t lo = vocab_begin / 64;
    const int64_t hi = std::min(words, (vocab_begin + logits.cols + 63) / 64);
    const int64_t window = hi - lo;
    std::vector<uint64_t>& staged = host_mask_window_;
    std::vector<int32_t>& slot_of_row = host_mask_slot_;
    staged.resize(static_cast<size_t>(rows * window));
    slot_of_row.assign(static_cast<size_t>(rows), -1);
    std::vector<int32_t>& slot_of_mask = host_slot_of_mask_;  // a plan's mask -> its slot
    slot_of_mask.assign(masks.size(), -1);
    int32_t slots = 0;
    for (int64_t r = 0; r < rows; ++r) {
      const int32_t m = row_mask[static_cast<size_t>(r)];
      if (m < 0) continue;
      if (slot_of_mask[static_cast<size_t>(m)] < 0) {
        std::copy_n(masks[static_cast<size_t>(m)].begin() + lo, window, staged.begin() + slots * window);
        slot_of_mask[static_cast<size_t>(m)] = slots++;
      }
      slot_of_row[static_cast<size_t>(r)] = slot_of_mask[static_cast<size_t>(m)];
    }
    const Tensor d = Stage(staged.data(), staged.size() * 8);
    const Tensor slot = Stage(slot_of_row.data(), slot_of_row.size() * 4);
    Launch("MaskTokens", [&] {
      return kernels::MaskTokens(logits.as<float>(), rows, logits.cols,
                                 reinterpret_cast<const uint64_t*>(d.data), window,
                                 slot.as<int32_t>(), vocab_begin - lo * 64, stream_);
    });
  }

  void GatherRows(const Tensor& x, std::span<const int64_t> rows, Tensor& out) override {
    const Tensor d = Stage(rows.data(), rows.size() * 8);
    Launch("GatherRows", [&] {
      return kernels::GatherRows(x.as<bf16>(), x.cols, d.as<int64_t>(),
                                 static_cast<int64_t>(rows.size()), out.as<bf16>(), stream_);
    });
  }

  void ScatterColumns(const Tensor& src, int64_t col_offset, Tensor& dst) override {
    Launch("ScatterColumns", [&] {
      return kernels::ScatterColumns(src.as<float>(), src.rows, src.cols, col_offset,
                                     dst.as<float>(), dst.cols, stream_);
    });
  }

 private:
  // Every launch of a step goes through here: a replayed graph holds it already (GraphRunner),
  // and a failure is kept with the op's name and the call site's file and line.
  template <class Work>
  void Launch(const char* what, Work&& work, const char* file = __builtin_FILE(),
              int line = __builtin_LINE()) {
    graphs_->Launch([&] { Record(work(), what, file, line); });
  }
  void Record(cudaError_t e, const char* what, const char* file, int line) {
    errors_.Note(e, what, file, line);
  }
  void Record(const Status& st, const char* what, const char* file, int line) {
    if (st.ok()) return;
    errors_.Note(st.WithContext(std::string(what) + " at " + file + ":" + std::to_string(line)));
  }

  // Every sequence starts at position 0 with enough tokens for tensor cores to pay off: all keys
  // are in this step's rows, so attention can run as two matrix products per head.
  static bool FreshPrefill(std::span<const SeqSlice> seqs) {
    if (seqs.empty()) return false;
    for (const SeqSlice& s : seqs) {
      if (s.start_pos != 0 || s.num_tokens < kMinPrefillTokens) return false;
    }
    return true;
  }

  void PrefillAttention(const Tensor& qkv, std::span<const SeqSlice> seqs, const AttentionParams& p,
                        Tensor& out) {
    if (!errors_.ok()) return;
    for (const SeqSlice& seq : seqs) {
      kernels::PrefillAttentionShape a;
      a.tokens = seq.num_tokens;
      a.q_heads = p.q_heads;
      a.kv_heads = p.kv_heads;
      a.head_dim = p.head_dim;
      a.row_stride = qkv.cols;
      a.scale = p.scale;
      a.softcap = p.softcap;
      a.window = p.window;
      const bf16* q = qkv.as<bf16>() + seq.row_begin * qkv.cols;
      bf16* o = out.as<bf16>() + seq.row_begin * out.cols;
      if (kernels::FlashPrefillSupports(a)) {
        Launch("FlashPrefillAttention",
               [&] { return kernels::FlashPrefillAttention(q, a, o, stream_); });
        continue;
      }
      const int64_t chunk = kernels::PrefillAttentionKvChunk(a, kPrefillWorkspaceBudget);
      const size_t bytes = kernels::PrefillAttentionWorkspace(a, chunk);
      if (bytes > attn_ws_bytes_) {  // persistent across layers and steps; grows on demand
        errors_.Note(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
        attn_ws_.reset();
        attn_ws_bytes_ = 0;
        Result<std::shared_ptr<void>> ws = DeviceAlloc(bytes);
        errors_.Note(ws.status().WithContext("prefill attention workspace"));
        if (!ws.ok()) return;
        attn_ws_ = std::move(*ws);
        attn_ws_bytes_ = bytes;
      }
      Launch("PrefillAttention", [&] {
        return kernels::PrefillAttention(*gemm_, q, a, attn_ws_.get(), chunk, o, stream_);
      });
    }
  }

  // FP8 weights: up to 16 tokens read them dequantized in registers (the GEMV up to 8, the bf16
  // tensor cores past it); more are quantized per token and multiplied on the FP8 tensor cores
  // (cuBLASLt, row and column scale vectors).
  void LinearFp8(const Tensor& x, const Tensor& w, Tensor& out, bool f32) {
    if (kernels::GemvFp8Supports(x.data, w.data, x.rows, x.cols)) {
      Launch("GemvFp8", [&] {
        return kernels::GemvFp8(x.as<bf16>(), w.as<uint8_t>(), w.row_scales, out.data, f32,
                                x.rows, w.rows, x.cols, stream_);
      });
      return;
    }
    if (skinny_fp8_ && kernels::SkinnyFp8Supports(x.data, w.data, x.rows, w.rows, x.cols)) {
      const int splits = kernels::SkinnyFp8Splits(w.rows, x.cols);
      Tensor partial;
      if (splits > 1) partial = Scratch(splits * x.rows, w.rows, DType::kF32);
      if (!errors_.ok()) return;
      Launch("SkinnyFp8", [&] {
        return kernels::SkinnyFp8(x.as<bf16>(), w.as<uint8_t>(), w.row_scales, out.data, f32,
                                  x.rows, w.rows, x.cols, splits, partial.as<float>(),
                                  static_cast<unsigned*>(skinny_arrivals_.get()), stream_);
      });
      return;
    }
    Tensor xq = Scratch(x.rows, x.cols, DType::kF8E4M3);
    Tensor xs = Scratch(x.rows, 1, DType::kF32);
    Tensor tmp;  // the unscaled product, where cuBLASLt cannot scale it
    if (!gemm_->fp8_outer_vec()) tmp = Scratch(x.rows, w.rows, DType::kF32);
    if (!errors_.ok()) return;
    Launch("QuantizeRowsFp8", [&] {
      return kernels::QuantizeRowsFp8(x.as<bf16>(), x.rows, x.cols, xq.as<uint8_t>(),
                                      xs.as<float>(), stream_);
    });
    Launch("FP8 GEMM", [&] {
      return gemm_->RunFp8(xq.data, xs.as<float>(), w.data, w.row_scales, out.data, f32, x.rows,
                           w.rows, x.cols, tmp.as<float>());
    });
  }

  // Device memory for a rows x cols bf16 weight (contents undefined).
  static Result<Tensor> NewWeight(int64_t rows, int64_t cols) {
    Tensor t;
    t.rows = rows;
    t.cols = cols;
    t.dtype = DType::kBF16;
    Result<std::shared_ptr<void>> mem = DeviceAlloc(static_cast<size_t>(rows * cols) * 2);
    RETURN_IF_ERROR(mem.status().WithContext("uploading a " + std::to_string(rows) + "x" +
                                             std::to_string(cols) + " weight"));
    t.storage = std::move(*mem);
    t.data = t.storage.get();
    return t;
  }

  // Each row's sampling request on the device (staged: a replayed graph reads this step's).
  Tensor StageSampling(std::span<const RowSampling> rows) {
    std::vector<kernels::DeviceSampling> dp(rows.size());
    for (size_t r = 0; r < rows.size(); ++r) {
      const SamplingParams& p = rows[r].params;
      dp[r] = {p.greedy ? 1 : 0, p.temperature, p.top_p, 0, p.top_k, p.seed, rows[r].counter};
    }
    return Stage(dp.data(), dp.size() * sizeof(kernels::DeviceSampling));
  }

  // Ends the step: the int32 ids in `d` (one per column) reach `ids` through the pinned area
  // after this step's staged inputs, after a captured or replayed graph has run.
  Status IdsToHost(const Tensor& d, int32_t* ids) {
    const size_t bytes = static_cast<size_t>(d.cols) * 4;
    char* staged = pinned_.Take(bytes);
    if (!staged) errors_.Note(Internal("cuda backend: no pinned room for a step's ids"));
    if (staged && d.data) {
      Launch("cudaMemcpyAsync (ids)", [&] {
        return cudaMemcpyAsync(staged, d.data, bytes, cudaMemcpyDeviceToHost, stream_);
      });
    }
    RETURN_IF_ERROR(graphs_->EndSection(errors_.status()));
    RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(stream_));
    RETURN_IF_ERROR(errors_.status());
    std::memcpy(ids, staged, bytes);
    return OkStatus();
  }

  // Step scratch from the arena (reset by BeginStep); empty, the failure kept, when out of memory.
  Tensor Scratch(int64_t rows, int64_t cols, DType dtype) {
    Tensor t;
    t.rows = rows;
    t.cols = cols;
    t.dtype = dtype;
    const size_t bytes = static_cast<size_t>(std::max<int64_t>(1, rows * cols) * DTypeSize(dtype));
    Result<void*> p = arena_.Take(bytes);
    if (!p.ok()) {
      errors_.Note(p.status());
      return t;
    }
    t.data = *p;
    if (opts_.poison_scratch) {
      Launch("Poison", [&] { return kernels::Poison(t.data, static_cast<int64_t>(bytes), stream_); });
    }
    return t;
  }

  // Copies host data into this step's scratch through the pinned area (rewritten next step only,
  // after BeginStep has synchronized); a replayed graph copies from there with its own copy.
  Tensor Stage(const void* host, size_t bytes) {
    Tensor t = Scratch(1, static_cast<int64_t>((bytes + 3) / 4), DType::kI32);
    if (!t.data || bytes == 0) return t;
    char* dst = pinned_.Take(bytes);
    if (!dst) {  // too large for staging: synchronous, never in a graph
      if (graphs_->in_graph()) {
        errors_.Note(Internal("cuda backend: staged input too large for a graph step"));
        return t;
      }
      errors_.Note(cudaMemcpyAsync(t.data, host, bytes, cudaMemcpyHostToDevice, stream_),
                   "cudaMemcpyAsync (large input)");
      errors_.Note(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
      return t;
    }
    std::memcpy(dst, host, bytes);
    Launch("cudaMemcpyAsync (staged input)", [&] {
      return cudaMemcpyAsync(t.data, dst, bytes, cudaMemcpyHostToDevice, stream_);
    });
    return t;
  }

  kernels::PagedKv Kv(int64_t layer) const {
    return pool_->Layer(layer, block_tables_, tables_per_group_);
  }

  const float* InvFreq(const AttentionParams& p) {
    const auto key = std::make_pair(p.head_dim, p.rope_theta);
    auto it = inv_freq_.find(key);
    if (it != inv_freq_.end()) return static_cast<const float*>(it->second.get());
    const auto f = RopeInvFreq(p.head_dim, p.rope_theta);
    Result<std::shared_ptr<void>> d = DeviceAlloc(f.size() * 4);
    errors_.Note(d.status().WithContext("RoPE frequencies"));
    if (!d.ok()) return nullptr;
    errors_.Note(cudaMemcpy(d->get(), f.data(), f.size() * 4, cudaMemcpyHostToDevice),
                 "cudaMemcpy (inv_freq)");
    return static_cast<const float*>(inv_freq_.emplace(key, std::move(*d)).first->second.get());
  }

  const CudaOptions opts_;
  cudaStream_t stream_ = nullptr;
  std::unique_ptr<kernels::Gemm> gemm_;
  std::unique_ptr<GraphRunner> graphs_;  // decode steps captured and replayed
  std::unique_ptr<PeerGroup> peers_;     // the fused all-reduce's buffers (ConnectPeers)
  StickyStatus errors_;  // first failure of any op; sticky (the device may be unusable after it)
  ScratchArena arena_;    // this step's device scratch
  PinnedStaging pinned_;  // this step's inputs on their way to the device
  std::unique_ptr<WeightStager> stager_;  // while weights load (UploadRows .. FinishUploads)
  std::unique_ptr<KvPool> pool_;
  // This step's metadata.
  kernels::StepTokens step_tokens_;
  std::vector<int32_t> host_token_seq_, host_token_pos_, host_tables_;  // BeginStep's, staged
  const int32_t* block_tables_ = nullptr;  // [group][sequence][logical block]
  size_t tables_per_group_ = 0;
  int64_t max_context_ = 0;  // this step's largest position + 1
  StepOutputKind output_ = StepOutputKind::kLogits;
  std::vector<uint64_t> host_mask_window_;  // MaskTokens' staging, kept across steps
  std::vector<int32_t> host_mask_slot_, host_slot_of_mask_;
  std::map<std::pair<int64_t, double>, std::shared_ptr<void>> inv_freq_;
  // Scores and probabilities of fresh prefills (PrefillAttention).
  static constexpr int64_t kMinPrefillTokens = 64;
  static constexpr size_t kPrefillWorkspaceBudget = size_t{2} << 30;
  std::shared_ptr<void> attn_ws_;
  size_t attn_ws_bytes_ = 0;
  Tensor attn_partial_;  // decode attention's split partials, this step
  std::shared_ptr<void> skinny_arrivals_;  // SkinnyFp8's counters (zero between products)
  bool skinny_fp8_ = true;
};

}  // namespace

Result<std::unique_ptr<Backend>> MakeCudaBackend(const CudaOptions& options) {
  auto b = std::make_unique<CudaBackend>(options);
  RETURN_IF_ERROR(b->Init());
  return std::unique_ptr<Backend>(std::move(b));
}

}  // namespace gemma2
