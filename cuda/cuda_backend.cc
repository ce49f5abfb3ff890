#include "cuda/cuda_backend.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <tuple>
#include <vector>

#include "common/cuda_check.h"
#include "cuda/peer_group.h"
#include "cuda/weight_stager.h"
#include "kernels/attention.h"
#include "kernels/elementwise.h"
#include "kernels/embed.h"
#include "kernels/flash_attention.h"
#include "kernels/fp8.h"
#include "kernels/gemm.h"
#include "kernels/gemv.h"
#include "kernels/kv_copy.h"
#include "kernels/prefill_attention.h"
#include "kernels/rms_norm.h"
#include "kernels/rope_kv.h"
#include "kernels/sample.h"
#include "kernels/shard_pick.h"
#include "model/rope.h"

namespace gemma2 {
namespace {

using kernels::bf16;

std::shared_ptr<void> DeviceAlloc(size_t bytes, Status* st) {
  void* p = nullptr;
  const cudaError_t e = cudaMalloc(&p, std::max<size_t>(bytes, 256));
  if (e != cudaSuccess) {
    *st = cuda_detail::Check(e, "cudaMalloc", __FILE__, __LINE__)
              .WithContext("allocating " + std::to_string(bytes >> 20) + " MiB");
    return nullptr;
  }
  return std::shared_ptr<void>(p, [](void* q) { cudaFree(q); });
}

// The paged KV cache: for each layer slot of a group (a layer's index among its group's layers on
// this rank), num_blocks blocks of [kv_head][slot][head_dim] bf16, k and v apart.
struct KvPool {
  KvLayerSlots layers;
  int64_t kv_heads = 0, head_dim = 0, block_size = 0, num_blocks = 0, max_blocks = 0;
  std::shared_ptr<void> k, v;
  int64_t block_elems() const { return kv_heads * block_size * head_dim; }
  int64_t slot_elems() const { return num_blocks * block_elems(); }
  bf16* k_layer(int64_t l) const { return static_cast<bf16*>(k.get()) + Slot(l) * slot_elems(); }
  bf16* v_layer(int64_t l) const { return static_cast<bf16*>(v.get()) + Slot(l) * slot_elems(); }
  int64_t Slot(int64_t l) const { return layers.slot[static_cast<size_t>(l)]; }
};

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(const CudaOptions& o) : opts_(o) {}
  ~CudaBackend() override {
    if (stream_) cudaStreamSynchronize(stream_);
    for (auto& [batch, g] : graphs_) {
      if (g.exec) cudaGraphExecDestroy(g.exec);
    }
    gemm_.reset();
    stager_.reset();
    if (pinned_) cudaFreeHost(pinned_);
    if (stream_) cudaStreamDestroy(stream_);
  }

  Status Init() {
    RETURN_IF_CUDA_ERROR(cudaSetDevice(opts_.device));
    RETURN_IF_CUDA_ERROR(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    ASSIGN_OR_RETURN(gemm_, kernels::Gemm::Create(stream_));
    pinned_bytes_ = size_t{64} << 20;
    RETURN_IF_CUDA_ERROR(cudaHostAlloc(&pinned_, pinned_bytes_, cudaHostAllocDefault));
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
    Tensor q;
    q.rows = w.rows;
    q.cols = w.cols;
    q.dtype = DType::kF8E4M3;
    Status st;
    const std::string what =
        "quantizing a " + std::to_string(w.rows) + "x" + std::to_string(w.cols) + " weight to FP8";
    q.storage = DeviceAlloc(static_cast<size_t>(w.numel()), &st);
    RETURN_IF_ERROR(st.WithContext(what));
    q.scale_storage = DeviceAlloc(static_cast<size_t>(w.rows) * sizeof(float), &st);
    RETURN_IF_ERROR(st.WithContext(what));
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
    if (capturing_ || replaying_)
      return Internal("cuda backend: OutputFromHost inside a graph step");
    Tensor t = Scratch(rows, cols, DType::kF32);
    RETURN_IF_ERROR(error_);
    RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(t.data, host, static_cast<size_t>(rows * cols) * 4,
                                         cudaMemcpyHostToDevice, stream_));
    RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(stream_));
    return t;
  }

  Status ToHost(const Tensor& t, float* host) override {
    if (replaying_ || capturing_) return Internal("cuda backend: ToHost inside a graph step");
    Note(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    RETURN_IF_ERROR(error_);
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
    Tensor scratch;
    Tensor params;
    if (greedy) {  // the two-pass argmax is faster than a sampling block per row
      scratch = Scratch(1, static_cast<int64_t>(kernels::ArgmaxScratchBytes(logits.rows) / 4),
                        DType::kF32);
    } else {
      params = StageSampling(rows);
      scratch = Scratch(
          1, static_cast<int64_t>(kernels::SampleScratchBytes(logits.rows, logits.cols) / 4),
          DType::kF32);
    }
    if (!replaying_) {
      if (greedy) {
        Note(kernels::ArgmaxRows(logits.as<float>(), logits.rows, logits.cols, scratch.data,
                                 d.as<int32_t>(), stream_),
             "ArgmaxRows");
      } else {
        Note(kernels::SampleRows(logits.as<float>(), logits.rows, logits.cols,
                                 static_cast<const kernels::DeviceSampling*>(params.data),
                                 scratch.data, d.as<int32_t>(), stream_),
             "SampleRows");
      }
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
    if (replaying_) return true;
    Note(kernels::PeerAllReduceAddRmsNorm(
             peers_->view(), residual.as<bf16>(), delta.as<bf16>(), post_w.as<bf16>(),
             next_w ? next_w->as<bf16>() : nullptr, delta.rows, eps, normed.as<bf16>(),
             static_cast<uint64_t>(opts_.peer_timeout_s) * 1000000000ull, stream_),
         "PeerAllReduceAddRmsNorm");
    return true;
  }

  void ShardBestScores(const Tensor& local, std::span<const RowSampling> rows, int64_t vocab_begin,
                       int rank, int tp, Tensor& exchange) override {
    const Tensor params = StageSampling(rows);
    const Tensor scratch = Scratch(
        1, static_cast<int64_t>(kernels::ShardBestScratchBytes(local.rows) / 4), DType::kF32);
    if (replaying_) return;
    Note(kernels::ShardBestRows(local.as<float>(), local.rows, local.cols, vocab_begin,
                                static_cast<const kernels::DeviceSampling*>(params.data), rank, tp,
                                scratch.data, exchange.as<float>(), stream_),
         "ShardBestRows");
  }

  Status ShardPickToHost(const Tensor& exchange, int tp, int32_t* ids) override {
    Tensor d = Scratch(1, exchange.rows, DType::kI32);
    if (!replaying_) {
      Note(kernels::DecideShardRows(exchange.as<float>(), exchange.rows, tp, d.as<int32_t>(),
                                    stream_),
           "DecideShardRows");
    }
    return IdsToHost(d, ids);
  }

  void* native_stream() override { return stream_; }
  bool replaying_graph() const override { return replaying_; }

  Status EndGraphSection() override {
    RETURN_IF_ERROR(FinishGraph());
    replaying_ = false;  // what follows runs eagerly, in the capturing step as in the replays
    return error_;
  }

  // One kernel over every pair and layer slot, on the step stream (ordered before the next
  // step's kernels). Between steps only: never inside a captured one.
  Status CopyKvBlocks(std::span<const int32_t> from, std::span<const int32_t> to) override {
    if (!pool_) return Internal("cuda backend: no KV pool");
    if (capturing_) return Internal("cuda backend: CopyKvBlocks inside a graph capture");
    if (from.size() != to.size()) return InvalidArgument("CopyKvBlocks: unpaired blocks");
    if (from.empty()) return error_;
    std::vector<int32_t> pairs(2 * from.size());
    for (size_t i = 0; i < from.size(); ++i) {
      if (from[i] < 0 || from[i] >= pool_->num_blocks || to[i] < 0 || to[i] >= pool_->num_blocks)
        return InvalidArgument("CopyKvBlocks: block out of range");
      pairs[2 * i] = from[i];
      pairs[2 * i + 1] = to[i];
    }
    const size_t bytes = pairs.size() * sizeof(int32_t);
    if (bytes > kv_copy_pairs_bytes_) {
      Note(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");  // the old list is unused
      Status st;
      kv_copy_pairs_ = DeviceAlloc(bytes, &st);
      RETURN_IF_ERROR(st);
      kv_copy_pairs_bytes_ = bytes;
    }
    // From pageable memory: returns once `pairs` is staged, ordered on the stream.
    Note(
        cudaMemcpyAsync(kv_copy_pairs_.get(), pairs.data(), bytes, cudaMemcpyHostToDevice, stream_),
        "cudaMemcpyAsync (KV block pairs)");
    Note(kernels::CopyKvBlocks(static_cast<bf16*>(pool_->k.get()),
                               static_cast<bf16*>(pool_->v.get()), pool_->layers.slots,
                               pool_->slot_elems(), pool_->block_elems(),
                               static_cast<const int32_t*>(kv_copy_pairs_.get()),
                               static_cast<int64_t>(from.size()), stream_),
         "CopyKvBlocks");
    return error_;
  }

  Result<int64_t> CreateKvPool(std::span<const KvGroup> layer_groups, int64_t kv_heads,
                               int64_t head_dim, int64_t block_size, int64_t blocks) override {
    if (pool_) return Internal("cuda backend: the KV pool exists already");
    if (block_size <= 0) return InvalidArgument("KV block size must be positive");
    auto pool = std::make_shared<KvPool>();
    pool->layers = KvLayerSlots(layer_groups);
    pool->kv_heads = kv_heads;
    pool->head_dim = head_dim;
    pool->block_size = block_size;
    pool->max_blocks = (opts_.max_positions + block_size - 1) / block_size;
    const int64_t per_block = 2 * pool->layers.slots * pool->block_elems() * 2;  // k+v, bf16
    if (blocks <= 0) {
      int64_t bytes = opts_.kv_cache_bytes;
      if (bytes <= 0) {
        size_t free_b = 0, total = 0;
        RETURN_IF_CUDA_ERROR(cudaMemGetInfo(&free_b, &total));
        // Leave room for a long prefill's activations (8192 tokens of 27B need about 3 GiB); on a
        // GPU that another process already fills, a quarter of what is left.
        bytes =
            std::max(static_cast<int64_t>(static_cast<double>(free_b) * 0.95) - (int64_t{8} << 30),
                     static_cast<int64_t>(free_b / 4));
      }
      blocks = bytes / per_block;
    }
    if (blocks < 1) return Status(StatusCode::kUnavailable, "no device memory left for a KV cache");
    pool->num_blocks = blocks;
    pool->k = DeviceAlloc(static_cast<size_t>(blocks * per_block / 2), &error_);
    pool->v = DeviceAlloc(static_cast<size_t>(blocks * per_block / 2), &error_);
    RETURN_IF_ERROR(error_);
    pool_ = std::move(pool);
    return blocks;
  }

  Status BeginStep(std::span<const SeqSlice> seqs, StepOutputKind output) override {
    output_ = output;
    Note(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    RETURN_IF_ERROR(error_);
    arena_chunk_ = 0;
    arena_offset_ = 0;
    pinned_offset_ = 0;
    replaying_ = capturing_ = false;
    attn_partial_ = Tensor{};
    if (!seqs.empty()) {
      if (!pool_) return Internal("cuda backend: no KV pool");
      RETURN_IF_ERROR(
          CheckNewPositionsMapped(seqs, pool_->layers.group, pool_->block_size, pool_->num_blocks));
    }
    // Block tables have a fixed stride (a sequence's most blocks), so every kernel argument of a
    // decode step depends only on its batch size: such steps are captured once and replayed.
    // Staged as [group][sequence][logical block]; unmapped entries (-1) are never read.
    const size_t max_blocks = pool_ ? static_cast<size_t>(pool_->max_blocks) : 0;
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
    if (decode) {
      RETURN_IF_ERROR(
          StartGraph({seqs.size(), output, kernels::AttentionContextBucket(max_context_)}));
    }
    step_tokens_.token_seq = Stage(token_seq.data(), token_seq.size() * 4).as<int32_t>();
    step_tokens_.token_pos = Stage(token_pos.data(), token_pos.size() * 4).as<int32_t>();
    block_tables_ = Stage(tables.data(), tables.size() * 4).as<int32_t>();
    table_stride_ = static_cast<int32_t>(max_blocks);
    return error_;
  }

  void Embed(std::span<const int32_t> ids, const Tensor& table, int64_t vocab_begin, float scale,
             Tensor& out) override {
    const Tensor d = Stage(ids.data(), ids.size() * 4);
    if (replaying_) return;
    Note(kernels::Embed(d.as<int32_t>(), static_cast<int64_t>(ids.size()), table.as<bf16>(),
                        table.rows, table.cols, vocab_begin, scale, out.as<bf16>(), stream_),
         "Embed");
  }

  void RmsNorm(const Tensor& x, const Tensor& w, float eps, Tensor& out) override {
    if (replaying_) return;
    Note(kernels::RmsNorm(x.as<bf16>(), w.as<bf16>(), x.rows, x.cols, eps, out.as<bf16>(), stream_),
         "RmsNorm");
  }

  void AddRmsNorm(Tensor& residual, const Tensor& delta, const Tensor& post_w, const Tensor* next_w,
                  float eps, Tensor& normed) override {
    if (replaying_) return;
    Note(kernels::AddRmsNorm(residual.as<bf16>(), delta.as<bf16>(), post_w.as<bf16>(),
                             next_w ? next_w->as<bf16>() : nullptr, residual.rows, residual.cols,
                             eps, normed.as<bf16>(), stream_),
         "AddRmsNorm");
  }

  void Linear(const Tensor& x, const Tensor& w, const Tensor* bias, Tensor& out) override {
    if (!error_.ok() || replaying_) return;
    const bool f32 = out.dtype == DType::kF32;
    if (w.dtype == DType::kF8E4M3) {
      LinearFp8(x, w, out, f32);
    } else if (kernels::GemvSupports(x.data, w.data, x.rows, x.cols)) {  // decode: memory-bound
      Note(
          kernels::Gemv(x.as<bf16>(), w.as<bf16>(), out.data, f32, x.rows, w.rows, x.cols, stream_),
          "Gemv");
    } else {
      const Status st = gemm_->Run(x.data, w.data, out.data, f32, x.rows, w.rows, x.cols);
      if (!st.ok()) error_ = st;
    }
    if (bias)
      Note(kernels::AddBias(out.data, f32, bias->as<bf16>(), out.rows, out.cols, stream_),
           "AddBias");
  }

  void RopeAndCacheWrite(Tensor& qkv, std::span<const SeqSlice>, int64_t layer,
                         const AttentionParams& p) override {
    if (replaying_) return;
    Note(kernels::RopeAndCacheWrite(
             qkv.as<bf16>(), qkv.cols, step_tokens_, static_cast<int32_t>(p.q_heads),
             static_cast<int32_t>(p.kv_heads), static_cast<int32_t>(p.head_dim), InvFreq(p),
             Kv(layer), stream_),
         "RopeAndCacheWrite");
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
    if (replaying_) return;
    const cudaError_t e =
        kernels::PagedAttention(qkv.as<bf16>(), qkv.cols, step_tokens_, max_context_, s, Kv(layer),
                                partial.as<float>(), out.as<bf16>(), stream_);
    if (e == cudaErrorInvalidValue && error_.ok()) {
      error_ = Unimplemented("cuda attention supports head_dim 128 and 256, not " +
                             std::to_string(p.head_dim));
      return;
    }
    Note(e, "PagedAttention");
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
    if (!error_.ok() || replaying_) return;
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
      if (kernels::FlashPrefillSupports(a)) {
        Note(kernels::FlashPrefillAttention(qkv.as<bf16>() + seq.row_begin * qkv.cols, a,
                                            out.as<bf16>() + seq.row_begin * out.cols, stream_),
             "FlashPrefillAttention");
        continue;
      }
      const int64_t chunk = kernels::PrefillAttentionKvChunk(a, kPrefillWorkspaceBudget);
      const size_t bytes = kernels::PrefillAttentionWorkspace(a, chunk);
      if (bytes > attn_ws_bytes_) {  // persistent across layers and steps; grows on demand
        Note(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
        attn_ws_ = DeviceAlloc(bytes, &error_);
        attn_ws_bytes_ = attn_ws_ ? bytes : 0;
        if (!attn_ws_) return;
      }
      const Status st = kernels::PrefillAttention(
          *gemm_, qkv.as<bf16>() + seq.row_begin * qkv.cols, a, attn_ws_.get(), chunk,
          out.as<bf16>() + seq.row_begin * out.cols, stream_);
      if (!st.ok() && error_.ok()) error_ = st;
    }
  }

  void GeluTanhMul(const Tensor& gate_up, Tensor& out) override {
    if (replaying_) return;
    Note(kernels::GeluTanhMul(gate_up.as<bf16>(), out.rows, out.cols, out.as<bf16>(), stream_),
         "GeluTanhMul");
  }

  void Softcap(Tensor& x, float cap) override {
    if (replaying_) return;
    Note(kernels::Softcap(x.as<float>(), x.numel(), cap, stream_), "Softcap");
  }

  void GatherRows(const Tensor& x, std::span<const int64_t> rows, Tensor& out) override {
    const Tensor d = Stage(rows.data(), rows.size() * 8);
    if (replaying_) return;
    Note(kernels::GatherRows(x.as<bf16>(), x.cols, d.as<int64_t>(),
                             static_cast<int64_t>(rows.size()), out.as<bf16>(), stream_),
         "GatherRows");
  }

  void ScatterColumns(const Tensor& src, int64_t col_offset, Tensor& dst) override {
    if (replaying_) return;
    Note(kernels::ScatterColumns(src.as<float>(), src.rows, src.cols, col_offset, dst.as<float>(),
                                 dst.cols, stream_),
         "ScatterColumns");
  }

 private:
  // Decode steps of one key (batch size, output kind, context bucket): the first runs eagerly
  // (creating GEMM plans and scratch), the second is captured into a graph, later ones replay it
  // with fresh inputs in the pinned area.
  using GraphKey = std::tuple<size_t, StepOutputKind, int>;
  Status StartGraph(GraphKey key) {
    current_graph_ = key;
    auto& g = graphs_[key];
    if (g.exec) {
      replaying_ = true;
    } else if (g.warm) {
      RETURN_IF_CUDA_ERROR(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
      capturing_ = true;
    } else {
      g.warm = true;
    }
    return OkStatus();
  }

  Status FinishGraph() {
    if (capturing_) {
      capturing_ = false;
      cudaGraph_t graph = nullptr;
      RETURN_IF_CUDA_ERROR(cudaStreamEndCapture(stream_, &graph));
      RETURN_IF_ERROR(error_);
      auto& g = graphs_[current_graph_];
      const cudaError_t e = cudaGraphInstantiate(&g.exec, graph, 0);
      cudaGraphDestroy(graph);
      RETURN_IF_CUDA_ERROR(e);
      replaying_ = true;
    }
    if (replaying_) RETURN_IF_CUDA_ERROR(cudaGraphLaunch(graphs_[current_graph_].exec, stream_));
    return OkStatus();
  }

  // Device memory for a rows x cols bf16 weight (contents undefined).
  // FP8 weights: few tokens read them in the GEMV (dequantized in registers); more are quantized
  // per token and multiplied on the FP8 tensor cores (cuBLASLt, row and column scale vectors).
  void LinearFp8(const Tensor& x, const Tensor& w, Tensor& out, bool f32) {
    if (kernels::GemvFp8Supports(x.data, w.data, x.rows, x.cols)) {
      Note(kernels::GemvFp8(x.as<bf16>(), w.as<uint8_t>(), w.row_scales, out.data, f32, x.rows,
                            w.rows, x.cols, stream_),
           "GemvFp8");
      return;
    }
    Tensor xq = Scratch(x.rows, x.cols, DType::kF8E4M3);
    Tensor xs = Scratch(x.rows, 1, DType::kF32);
    Tensor tmp;  // the unscaled product, where cuBLASLt cannot scale it
    if (!gemm_->fp8_outer_vec()) tmp = Scratch(x.rows, w.rows, DType::kF32);
    if (!error_.ok()) return;
    Note(kernels::QuantizeRowsFp8(x.as<bf16>(), x.rows, x.cols, xq.as<uint8_t>(), xs.as<float>(),
                                  stream_),
         "QuantizeRowsFp8");
    const Status st = gemm_->RunFp8(xq.data, xs.as<float>(), w.data, w.row_scales, out.data, f32,
                                    x.rows, w.rows, x.cols, tmp.as<float>());
    if (!st.ok()) error_ = st.WithContext("FP8 GEMM");
  }

  static Result<Tensor> NewWeight(int64_t rows, int64_t cols) {
    Tensor t;
    t.rows = rows;
    t.cols = cols;
    t.dtype = DType::kBF16;
    Status st;
    t.storage = DeviceAlloc(static_cast<size_t>(rows * cols) * 2, &st);
    RETURN_IF_ERROR(st.WithContext("uploading a " + std::to_string(rows) + "x" +
                                   std::to_string(cols) + " weight"));
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
    auto* staged = reinterpret_cast<int32_t*>(static_cast<char*>(pinned_) + pinned_offset_);
    const size_t bytes = static_cast<size_t>(d.cols) * 4;
    if (!replaying_) {
      Note(cudaMemcpyAsync(staged, d.data, bytes, cudaMemcpyDeviceToHost, stream_),
           "cudaMemcpyAsync(ids)");
    }
    RETURN_IF_ERROR(FinishGraph());
    RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(stream_));
    RETURN_IF_ERROR(error_);
    std::memcpy(ids, staged, bytes);
    return OkStatus();
  }

  void Note(cudaError_t e, const char* what) {
    if (e != cudaSuccess && error_.ok()) error_ = cuda_detail::Check(e, what, __FILE__, __LINE__);
  }

  // Bump allocation from chunks kept across steps, so a steady state allocates nothing.
  Tensor Scratch(int64_t rows, int64_t cols, DType dtype) {
    Tensor t;
    t.rows = rows;
    t.cols = cols;
    t.dtype = dtype;
    const size_t bytes =
        (static_cast<size_t>(std::max<int64_t>(1, rows * cols) * DTypeSize(dtype)) + 255) &
        ~size_t{255};
    while (arena_chunk_ < chunks_.size() && arena_offset_ + bytes > chunk_bytes_[arena_chunk_]) {
      ++arena_chunk_;
      arena_offset_ = 0;
    }
    if (arena_chunk_ == chunks_.size()) {
      const size_t size = std::max(bytes, size_t{256} << 20);
      auto chunk = DeviceAlloc(size, &error_);
      if (!chunk) return t;
      chunks_.push_back(std::move(chunk));
      chunk_bytes_.push_back(size);
      arena_offset_ = 0;
    }
    t.data = static_cast<char*>(chunks_[arena_chunk_].get()) + arena_offset_;
    arena_offset_ += bytes;
    if (opts_.poison_scratch && !replaying_) {
      Note(kernels::Poison(t.data, static_cast<int64_t>(bytes), stream_), "Poison");
    }
    return t;
  }

  // Copies host data into this step's scratch through pinned memory (rewritten next step only,
  // after BeginStep has synchronized).
  Tensor Stage(const void* host, size_t bytes) {
    Tensor t = Scratch(1, static_cast<int64_t>((bytes + 3) / 4), DType::kI32);
    if (!t.data || bytes == 0) return t;
    if (pinned_offset_ + bytes > pinned_bytes_) {  // too large for staging: synchronous, no graph
      if (capturing_ || replaying_) {
        if (error_.ok()) error_ = Internal("cuda backend: staged input too large for a graph step");
        return t;
      }
      Note(cudaMemcpyAsync(t.data, host, bytes, cudaMemcpyHostToDevice, stream_),
           "cudaMemcpyAsync");
      Note(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
      return t;
    }
    char* dst = static_cast<char*>(pinned_) + pinned_offset_;
    std::memcpy(dst, host, bytes);  // a replayed graph copies from here to t.data
    pinned_offset_ += (bytes + 255) & ~size_t{255};
    if (!replaying_) {
      Note(cudaMemcpyAsync(t.data, dst, bytes, cudaMemcpyHostToDevice, stream_), "cudaMemcpyAsync");
    }
    return t;
  }

  kernels::PagedKv Kv(int64_t layer) const {
    kernels::PagedKv kv;
    kv.k = pool_->k_layer(layer);
    kv.v = pool_->v_layer(layer);
    kv.block_tables =
        block_tables_ +
        static_cast<size_t>(pool_->layers.group[static_cast<size_t>(layer)]) * tables_per_group_;
    kv.table_stride = table_stride_;
    kv.block_size = static_cast<int32_t>(pool_->block_size);
    kv.kv_heads = static_cast<int32_t>(pool_->kv_heads);
    return kv;
  }

  const float* InvFreq(const AttentionParams& p) {
    const auto key = std::make_pair(p.head_dim, p.rope_theta);
    auto it = inv_freq_.find(key);
    if (it != inv_freq_.end()) return static_cast<const float*>(it->second.get());
    const auto f = RopeInvFreq(p.head_dim, p.rope_theta);
    auto d = DeviceAlloc(f.size() * 4, &error_);
    if (!d) return nullptr;
    Note(cudaMemcpy(d.get(), f.data(), f.size() * 4, cudaMemcpyHostToDevice),
         "cudaMemcpy(inv_freq)");
    return static_cast<const float*>(inv_freq_.emplace(key, std::move(d)).first->second.get());
  }

  const CudaOptions opts_;
  cudaStream_t stream_ = nullptr;
  std::unique_ptr<kernels::Gemm> gemm_;
  std::unique_ptr<PeerGroup> peers_;  // the fused all-reduce's buffers (ConnectPeers)
  Status error_;  // first failure of any op; sticky (the device may be unusable after it)
  // Scratch arena (reset by BeginStep).
  std::vector<std::shared_ptr<void>> chunks_;
  std::vector<size_t> chunk_bytes_;
  size_t arena_chunk_ = 0, arena_offset_ = 0;
  void* pinned_ = nullptr;
  // While weights load (UploadRows .. FinishUploads).
  std::unique_ptr<WeightStager> stager_;
  // CopyKvBlocks' (from, to) list on the device.
  std::shared_ptr<void> kv_copy_pairs_;
  size_t kv_copy_pairs_bytes_ = 0;
  size_t pinned_bytes_ = 0, pinned_offset_ = 0;
  // KV cache and this step's metadata.
  std::shared_ptr<KvPool> pool_;
  kernels::StepTokens step_tokens_;
  std::vector<int32_t> host_token_seq_, host_token_pos_, host_tables_;  // BeginStep's, staged
  const int32_t* block_tables_ = nullptr;  // [group][sequence][logical block]
  size_t tables_per_group_ = 0;
  int32_t table_stride_ = 0;
  std::map<std::pair<int64_t, double>, std::shared_ptr<void>> inv_freq_;
  // Scores and probabilities of fresh prefills (PrefillAttention).
  static constexpr int64_t kMinPrefillTokens = 64;
  static constexpr size_t kPrefillWorkspaceBudget = size_t{2} << 30;
  std::shared_ptr<void> attn_ws_;
  Tensor attn_partial_;  // decode attention's split partials, this step
  size_t attn_ws_bytes_ = 0;
  // Decode graphs by batch size.
  struct Graph {
    bool warm = false;
    cudaGraphExec_t exec = nullptr;
  };
  std::map<GraphKey, Graph> graphs_;  // by batch size, output kind and context bucket
  GraphKey current_graph_{};
  int64_t max_context_ = 0;  // this step's largest position + 1
  StepOutputKind output_ = StepOutputKind::kLogits;
  bool capturing_ = false, replaying_ = false;
};

}  // namespace

Result<std::unique_ptr<Backend>> MakeCudaBackend(const CudaOptions& options) {
  auto b = std::make_unique<CudaBackend>(options);
  RETURN_IF_ERROR(b->Init());
  return std::unique_ptr<Backend>(std::move(b));
}

}  // namespace gemma2
