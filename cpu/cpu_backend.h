// The reference backend: every op in fp32 on the host, matrix products through OpenBLAS.
// Each op here is the specification its CUDA twin in kernels/ is tested against.
#pragma once

#include <map>
#include <vector>

#include "model/backend.h"

namespace gemma2 {

// KV blocks a cpu pool offers when none are asked for (host memory is taken as blocks are used).
inline constexpr int64_t kCpuDefaultKvBlocks = int64_t{1} << 16;

class CpuBackend final : public Backend {
 public:
  std::string_view name() const override { return "cpu"; }
  DType weight_dtype() const override { return DType::kF32; }
  DType activation_dtype() const override { return DType::kF32; }

  Result<Tensor> Upload(const void* host, DType dtype, int64_t rows, int64_t cols) override;
  Status QuantizeFp8(Tensor& w) override;
  Result<Tensor> UploadRows(DType dtype, int64_t rows, int64_t cols,
                            const RowFiller& fill) override;
  Tensor Alloc(int64_t rows, int64_t cols) override;
  Tensor AllocOutput(int64_t rows, int64_t cols) override { return Alloc(rows, cols); }
  Result<Tensor> OutputFromHost(const float* host, int64_t rows, int64_t cols) override {
    Tensor t = Alloc(rows, cols);
    std::copy(host, host + rows * cols, t.as<float>());
    return t;
  }
  Status ToHost(const Tensor& t, float* host) override;
  Status SampleToHost(const Tensor& logits, std::span<const RowSampling> rows,
                      int32_t* ids) override;
  Status BeginStep(std::span<const SeqSlice> seqs, StepOutputKind, bool) override;
  Result<int64_t> CreateKvPool(std::span<const KvGroup> layer_groups, int64_t kv_heads,
                               int64_t head_dim, int64_t block_size, int64_t blocks,
                               KvCacheDtype dtype) override;
  Status CopyKvBlocks(std::span<const int32_t> from, std::span<const int32_t> to) override;

  void Embed(std::span<const int32_t> ids, const Tensor& table, int64_t vocab_begin, float scale,
             Tensor& out) override;
  void RmsNorm(const Tensor& x, const Tensor& w, float eps, Tensor& out) override;
  void AddRmsNorm(Tensor& residual, const Tensor& delta, const Tensor& post_w, const Tensor* next_w,
                  float eps, Tensor& normed) override;
  void Linear(const Tensor& x, const Tensor& w, const Tensor* bias, Tensor& out) override;
  void RopeAndCacheWrite(Tensor& qkv, std::span<const SeqSlice> seqs, int64_t layer,
                         const AttentionParams& p) override;
  void Attention(const Tensor& qkv, std::span<const SeqSlice> seqs, int64_t layer,
                 const AttentionParams& p, Tensor& out) override;
  void GeluTanhMul(const Tensor& gate_up, Tensor& out) override;
  void Softcap(Tensor& x, float cap) override;
  void MaskTokens(Tensor& logits, std::span<const TokenMaskWords> masks,
                  std::span<const int32_t> row_mask, int64_t vocab_begin) override;
  void GatherRows(const Tensor& x, std::span<const int64_t> rows, Tensor& out) override;
  void ScatterColumns(const Tensor& src, int64_t col_offset, Tensor& dst) override;
  void ShardBestScores(const Tensor& local, std::span<const RowSampling> rows, int64_t vocab_begin,
                       int rank, int tp, Tensor& exchange) override;
  Status ShardPickToHost(const Tensor& exchange, int tp, int32_t* ids) override;

 private:
  const std::vector<float>& InvFreq(int64_t head_dim, double theta);
  // Row [kv_heads * head_dim] of k (or v) at `pos` of local layer `layer` of a sequence.
  float* KvRow(bool v, int64_t layer, const SeqSlice& s, int64_t pos);

  // The paged cache: block b holds, per layer slot of its group, k and v as
  // [slot position][kv_heads * head_dim]; a block's memory is allocated when first touched.
  struct KvPool {
    KvLayerSlots layers;
    int64_t width = 0, block_size = 0, blocks = 0;
    bool fp8 = false;  // --kv-cache-dtype fp8: rows rounded through E4M3 as they are written
    std::vector<std::vector<float>> k, v;  // per block
  };
  KvPool kv_;
  std::map<std::pair<int64_t, double>, std::vector<float>> inv_freq_;  // RoPE, computed once
};

// Sets OpenBLAS's thread count (the in-process tp run gives each rank thread its share).
void SetCpuMathThreads(int threads);

}  // namespace gemma2
