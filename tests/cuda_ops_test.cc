// Every cuda op against its cpu twin (the specification) on awkward shapes: odd sizes, ragged
// batches, windows that start mid-block, GQA ratios 1/2/4, block boundaries, chunked prefill.
// Scratch is poisoned with NaN so an element a kernel forgets to write fails the comparison.
//
// Tolerances: inputs are bf16-exact on both sides; the cuda side rounds its outputs to bf16
// (relative 2^-9 ~ 2e-3 per value), so per-row relative L2 of 5e-3 passes rounding and fails any
// wrong element; attention compounds the rounding of rotated q and k (2e-2). fp32 outputs differ
// only in summation order (1e-4).
#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <random>
#include <set>
#include <thread>

#include "cpu/cpu_backend.h"
#include "cuda/weight_stager.h"
#include "engine/backend_factory.h"
#include "engine/engine.h"
#include "kernels/fp8.h"
#include "model/quantization.h"
#include "tests/gpu_util.h"
#include "tests/reference_util.h"

namespace gemma2 {
namespace {

using testing::RelativeL2;

class CudaOpsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    GEMMA2_REQUIRE_GPU();
    gpu_ = NewGpu();
    ASSERT_NE(gpu_, nullptr);
  }
  static std::unique_ptr<Backend> NewGpu() {
    BackendOptions o;
    o.name = "cuda";
    o.kv_cache_bytes = int64_t{256} << 20;
    o.poison_scratch = true;
    auto b = MakeBackend(o);
    EXPECT_TRUE(b.ok()) << b.status().ToString();
    return b.ok() ? std::move(b).value() : nullptr;
  }
  // Values rounded to bf16 so both backends see identical inputs.
  static std::vector<float> Rand(int64_t n, float scale, uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> d(0.0f, scale);
    std::vector<float> v(static_cast<size_t>(n));
    for (auto& x : v) x = Bf16ToF32(F32ToBf16(d(rng)));
    return v;
  }
  static Tensor Put(Backend& b, const std::vector<float>& h, int64_t rows, int64_t cols) {
    auto t = b.Upload(h.data(), DType::kF32, rows, cols);
    EXPECT_TRUE(t.ok()) << t.status().ToString();
    return t.ok() ? *t : Tensor{};
  }
  static std::vector<float> Get(Backend& b, const Tensor& t) {
    std::vector<float> h(static_cast<size_t>(t.numel()));
    const Status st = b.ToHost(t, h.data());
    EXPECT_TRUE(st.ok()) << st.ToString();
    return h;
  }
  // Per-row relative L2 of gpu vs cpu; returns the worst row's.
  static double ExpectRowsClose(const std::vector<float>& gpu, const std::vector<float>& cpu,
                                int64_t cols, double tol, const std::string& what) {
    EXPECT_EQ(gpu.size(), cpu.size()) << what;
    if (gpu.size() != cpu.size()) return INFINITY;
    double worst = 0;
    for (size_t r = 0; r * cols < gpu.size(); ++r) {
      const double err = RelativeL2(gpu.data() + r * cols, cpu.data() + r * cols, cols);
      EXPECT_LE(err, tol) << what << " row " << r;  // NaN (poison) fails too
      worst = std::isnan(err) ? INFINITY : std::max(worst, err);
    }
    return worst;
  }
  // Starts a step with no sequences (for ops that need no KV cache).
  void EmptyStep(Backend& b) { ASSERT_TRUE(b.BeginStep({}, StepOutputKind::kLogits, false).ok()); }
  std::unique_ptr<Backend> gpu_;
  CpuBackend cpu_;
};

// One owner's block tables over a gpu and a cpu pool of the same shape: `layers` local layers,
// the last one sliding-window when window > 0 (its blocks below the window are given back and
// reused by the other sequences). Few blocks, so reuse happens.
struct SharedKv {
  static constexpr int64_t kBlockSize = 16, kBlocks = 64;
  SharedKv(Backend& gpu, Backend& cpu, int64_t layers, int64_t kv_heads, int64_t head_dim,
           int64_t window, KvCacheDtype dtype = KvCacheDtype::kAuto)
      : tables(Layout(layers, window), kBlocks) {
    std::vector<KvGroup> groups(static_cast<size_t>(layers), KvGroup::kFull);
    if (window > 0) groups.back() = KvGroup::kSliding;
    for (Backend* b : {&gpu, &cpu}) {
      auto made = b->CreateKvPool(groups, kv_heads, head_dim, kBlockSize, kBlocks, dtype);
      EXPECT_TRUE(made.ok() && *made == kBlocks) << made.status().ToString();
    }
  }
  static KvLayout Layout(int64_t layers, int64_t window) {
    KvLayout l;
    l.block_size = kBlockSize;
    l.window = window;
    l.max_blocks = 8192 / kBlockSize;  // the backends' max_positions
    l.present[static_cast<size_t>(KvGroup::kFull)] = window == 0 || layers > 1;
    l.present[static_cast<size_t>(KvGroup::kSliding)] = window > 0;
    return l;
  }
  // Plans a step: step[s] new positions for sequence s (0: not in it). Slices in sequence order.
  // `copies` run first, on both backends (a copy's destination starts at its `tokens`).
  std::vector<SeqSlice> Step(const std::vector<int64_t>& step, int64_t* rows,
                             const std::vector<KvCopy>& copies = {}, Backend* gpu = nullptr,
                             Backend* cpu = nullptr) {
    StepPlan plan;
    plan.kv_copies = copies;
    for (const KvCopy& c : copies) len[c.dst] = c.tokens;
    for (size_t s = 0; s < step.size(); ++s) {
      if (step[s] == 0) continue;
      StepSequence q;
      q.sequence_id = static_cast<int64_t>(s);
      q.start_pos = len[q.sequence_id];
      q.tokens.assign(static_cast<size_t>(step[s]), 0);
      plan.sequences.push_back(q);
    }
    const Status st = tables.Plan(plan, &plan.kv_assign);
    EXPECT_TRUE(st.ok()) << st.ToString();
    for (const KvCopy& c : copies) {
      std::vector<int32_t> from, to;
      EXPECT_TRUE(tables.CopyPairs(c.src, c.dst, c.tokens, &from, &to).ok());
      for (Backend* b : {gpu, cpu}) {
        const Status copied = b->CopyKvBlocks(from, to);
        EXPECT_TRUE(copied.ok()) << copied.ToString();
      }
    }
    std::vector<SeqSlice> slices;
    *rows = 0;
    for (const StepSequence& q : plan.sequences) {
      const int64_t n = static_cast<int64_t>(q.tokens.size());
      slices.push_back({{tables.table(q.sequence_id, KvGroup::kFull),
                         tables.table(q.sequence_id, KvGroup::kSliding)},
                        q.start_pos,
                        n,
                        *rows});
      *rows += n;
      len[q.sequence_id] += n;
    }
    return slices;
  }
  KvBlockTables tables;
  std::map<int64_t, int64_t> len;
};

TEST_F(CudaOpsTest, RmsNormAndAddRmsNorm) {
  EmptyStep(*gpu_);
  for (auto [rows, hidden] : {std::pair{1, 4608}, {3, 2304}, {17, 100}, {2, 3584}, {2, 6000}}) {
    SCOPED_TRACE(std::to_string(rows) + "x" + std::to_string(hidden));
    const auto x = Rand(rows * hidden, 3.0f, 1), d = Rand(rows * hidden, 5.0f, 2);
    const auto w1 = Rand(hidden, 0.1f, 3), w2 = Rand(hidden, 0.1f, 4);
    Tensor gx = Put(*gpu_, x, rows, hidden), cx = Put(cpu_, x, rows, hidden);
    Tensor gd = Put(*gpu_, d, rows, hidden), cd = Put(cpu_, d, rows, hidden);
    Tensor gw1 = Put(*gpu_, w1, 1, hidden), cw1 = Put(cpu_, w1, 1, hidden);
    Tensor gw2 = Put(*gpu_, w2, 1, hidden), cw2 = Put(cpu_, w2, 1, hidden);
    Tensor go = gpu_->Alloc(rows, hidden), co = cpu_.Alloc(rows, hidden);
    gpu_->RmsNorm(gx, gw1, 1e-6f, go);
    cpu_.RmsNorm(cx, cw1, 1e-6f, co);
    ExpectRowsClose(Get(*gpu_, go), Get(cpu_, co), hidden, 5e-3, "RmsNorm");
    gpu_->AddRmsNorm(gx, gd, gw1, &gw2, 1e-6f, go);
    cpu_.AddRmsNorm(cx, cd, cw1, &cw2, 1e-6f, co);
    ExpectRowsClose(Get(*gpu_, gx), Get(cpu_, cx), hidden, 5e-3, "AddRmsNorm residual");
    ExpectRowsClose(Get(*gpu_, go), Get(cpu_, co), hidden, 5e-3, "AddRmsNorm normed");
  }
}

TEST_F(CudaOpsTest, LinearBf16AndFp32OutputsWithBias) {
  EmptyStep(*gpu_);
  // 33 and 40 tokens (and 12 and 16) share one timing bucket: the second of each takes the
  // first's cuBLASLt pick (kernels/gemm.h).
  for (auto [t, n, k] : {std::tuple{1, 4608, 4608},
                         {2, 4608, 36864},
                         {3, 1001, 72},
                         {4, 7, 64},
                         {7, 96, 4608},
                         {33, 1000, 64},
                         {40, 1000, 64},
                         {12, 96, 4608},
                         {16, 96, 4608},
                         {5, 3, 72},
                         {1, 5, 20}}) {
    SCOPED_TRACE(std::to_string(t) + "x" + std::to_string(n) + "x" + std::to_string(k));
    const auto x = Rand(t * k, 1.0f, 5), w = Rand(n * k, 0.05f, 6), b = Rand(n, 1.0f, 7);
    Tensor gx = Put(*gpu_, x, t, k), cx = Put(cpu_, x, t, k);
    Tensor gw = Put(*gpu_, w, n, k), cw = Put(cpu_, w, n, k);
    Tensor gb = Put(*gpu_, b, 1, n), cb = Put(cpu_, b, 1, n);
    Tensor g16 = gpu_->Alloc(t, n), g32 = gpu_->AllocOutput(t, n), c32 = cpu_.AllocOutput(t, n);
    gpu_->Linear(gx, gw, nullptr, g16);
    gpu_->Linear(gx, gw, &gb, g32);
    cpu_.Linear(cx, cw, nullptr, c32);
    const auto plain = Get(cpu_, c32);
    ExpectRowsClose(Get(*gpu_, g16), plain, n, 5e-3, "Linear bf16 out");
    cpu_.Linear(cx, cw, &cb, c32);
    ExpectRowsClose(Get(*gpu_, g32), Get(cpu_, c32), n, 1e-4, "Linear fp32 out + bias");
  }
}

// FP8 weights: the quantization kernel writes QuantizeRowsFp8's bytes and scales exactly; the
// GEMV (up to 8 tokens) and the skinny tensor-core product (up to 16 tokens; 8 K splits, 3
// uneven ones, warps with no chunk, one split) take bf16 activations and equal the cpu product on
// the dequantized weights up to summation order, and a second run equals the first bit for bit (the
// splits add in a fixed order; the arrival counters are back at zero); the FP8 GEMM (shapes the
// others do not take) also quantizes the activations per token (E4M3: relative rounding up to
// 2^-4 per value), so its rows sit a few percent off.
TEST_F(CudaOpsTest, LinearFp8) {
  EmptyStep(*gpu_);
  for (auto [t, n, k] : {std::tuple{1, 4608, 4608},
                         {2, 4608, 36864},
                         {8, 1001, 64},
                         {5, 3, 16},
                         {9, 96, 4608},
                         {12, 64, 832},
                         {16, 4608, 36864},
                         {24, 8192, 4608},
                         {16, 73728, 64},
                         {13, 32, 64},
                         {33, 1000, 64},
                         {40, 1000, 64},
                         {64, 4608, 4608},
                         {300, 512, 4608}}) {
    SCOPED_TRACE(std::to_string(t) + "x" + std::to_string(n) + "x" + std::to_string(k));
    const auto x = Rand(t * k, 1.0f, 5), w = Rand(n * k, 0.05f, 6);
    Tensor gx = Put(*gpu_, x, t, k), cx = Put(cpu_, x, t, k);
    Tensor gw = Put(*gpu_, w, n, k), cw = Put(cpu_, w, n, k);
    ASSERT_TRUE(gpu_->QuantizeFp8(gw).ok());
    ASSERT_TRUE(cpu_.QuantizeFp8(cw).ok());
    ASSERT_EQ(gw.dtype, DType::kF8E4M3);
    std::vector<uint8_t> q(static_cast<size_t>(n * k)), want_q(q.size());
    std::vector<float> s(static_cast<size_t>(n)), want_s(s.size());
    ASSERT_EQ(cudaMemcpy(q.data(), gw.data, q.size(), cudaMemcpyDeviceToHost), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(s.data(), gw.row_scales, s.size() * 4, cudaMemcpyDeviceToHost),
              cudaSuccess);
    QuantizeRowsFp8(w.data(), n, k, want_q.data(), want_s.data());
    EXPECT_EQ(s, want_s);
    EXPECT_EQ(q, want_q);
    Tensor g16 = gpu_->Alloc(t, n), g32 = gpu_->AllocOutput(t, n), again = gpu_->AllocOutput(t, n),
           c32 = cpu_.AllocOutput(t, n);
    gpu_->Linear(gx, gw, nullptr, g16);
    gpu_->Linear(gx, gw, nullptr, g32);
    gpu_->Linear(gx, gw, nullptr, again);
    cpu_.Linear(cx, cw, nullptr, c32);
    const auto want = Get(cpu_, c32);
    const bool exact = kernels::GemvFp8Supports(gx.data, gw.data, t, k) ||
                       kernels::SkinnyFp8Supports(gx.data, gw.data, t, n, k);
    ExpectRowsClose(Get(*gpu_, g16), want, n, exact ? 5e-3 : 6e-2, "LinearFp8 bf16 out");
    const auto got = Get(*gpu_, g32);
    ExpectRowsClose(got, want, n, exact ? 1e-4 : 6e-2, "LinearFp8 fp32 out");
    EXPECT_EQ(std::memcmp(got.data(), Get(*gpu_, again).data(), got.size() * 4), 0);
  }
}

TEST_F(CudaOpsTest, EmbedVocabShardGeluSoftcapScatterGatherArgmax) {
  EmptyStep(*gpu_);
  const int64_t rows = 400, hidden = 72, begin = 300;  // this rank owns ids [300, 700)
  const auto table = Rand(rows * hidden, 1.0f, 8);
  Tensor gt = Put(*gpu_, table, rows, hidden), ct = Put(cpu_, table, rows, hidden);
  const std::vector<int32_t> ids = {0, 299, 300, 512, 699, 700, 999};
  const int64_t n = static_cast<int64_t>(ids.size());
  Tensor ge = gpu_->Alloc(n, hidden), ce = cpu_.Alloc(n, hidden);
  gpu_->Embed(ids, gt, begin, 68.0f, ge);
  cpu_.Embed(ids, ct, begin, 68.0f, ce);
  const auto gev = Get(*gpu_, ge), cev = Get(cpu_, ce);
  for (int64_t i = 0; i < n * hidden; ++i) ASSERT_EQ(gev[i], Bf16ToF32(F32ToBf16(cev[i]))) << i;

  const auto gu = Rand(5 * 2 * 1001, 2.0f, 9);
  Tensor ggu = Put(*gpu_, gu, 5, 2002), cgu = Put(cpu_, gu, 5, 2002);
  Tensor ga = gpu_->Alloc(5, 1001), ca = cpu_.Alloc(5, 1001);
  gpu_->GeluTanhMul(ggu, ga);
  cpu_.GeluTanhMul(cgu, ca);
  ExpectRowsClose(Get(*gpu_, ga), Get(cpu_, ca), 1001, 5e-3, "GeluTanhMul");

  const std::vector<int64_t> pick = {4, 0, 4, 2};
  Tensor gg = gpu_->Alloc(4, 1001), cg = cpu_.Alloc(4, 1001);
  gpu_->GatherRows(ga, pick, gg);
  cpu_.GatherRows(ca, pick, cg);
  ExpectRowsClose(Get(*gpu_, gg), Get(cpu_, cg), 1001, 5e-3, "GatherRows");

  // fp32 logits: project, softcap, scatter into a wider row, argmax.
  const auto w = Rand(37 * 1001, 0.2f, 10);
  Tensor gw = Put(*gpu_, w, 37, 1001), cw = Put(cpu_, w, 37, 1001);
  Tensor gl = gpu_->AllocOutput(4, 37), cl = cpu_.AllocOutput(4, 37);
  gpu_->Linear(gg, gw, nullptr, gl);
  cpu_.Linear(cg, cw, nullptr, cl);
  gpu_->Softcap(gl, 30.0f);
  cpu_.Softcap(cl, 30.0f);
  Tensor gf = gpu_->AllocOutput(4, 100), cf = cpu_.AllocOutput(4, 100);
  gpu_->ScatterColumns(gl, 50, gf);
  cpu_.ScatterColumns(cl, 50, cf);
  const auto gfv = Get(*gpu_, gf), cfv = Get(cpu_, cf);
  ExpectRowsClose(gfv, cfv, 100, 1e-2, "Softcap + ScatterColumns");
  for (int r = 0; r < 4; ++r) {
    for (int j = 0; j < 100; ++j) {
      if (j < 50 || j >= 87) {
        ASSERT_EQ(gfv[r * 100 + j], 0.0f) << r << "," << j;
      }
    }
  }
  // Argmax of the same values: the first maximum, as torch.argmax (rows whose logits are all
  // negative tie at the scattered zeros and must pick column 0).
  std::vector<int32_t> gids(4);
  std::vector<RowSampling> greedy(4);
  ASSERT_TRUE(gpu_->SampleToHost(gf, greedy, gids.data()).ok());
  for (int r = 0; r < 4; ++r) {
    const float* row = gfv.data() + r * 100;
    EXPECT_EQ(gids[r], std::max_element(row, row + 100) - row) << r;
  }
}

// Structured output's masks on a rank's columns: a shard starting mid-word (ids from 150 of a
// 1001-token vocabulary), rows with their own masks; the gpu's -inf where the cpu's are.
TEST_F(CudaOpsTest, MaskTokensMatchesTheSpecification) {
  EmptyStep(*gpu_);
  const int64_t rows = 4, cols = 413, vocab = 1001, begin = 150;
  const int64_t words = TokenMaskWordCount(vocab);
  std::mt19937_64 rng(3);
  // Rows 0 and 3 share mask 2, row 1 has mask 0, row 2 none; mask 1 is named by no row.
  const std::vector<int32_t> row_mask = {2, 0, -1, 2};
  std::vector<TokenMaskWords> masks(3, TokenMaskWords(static_cast<size_t>(words)));
  for (auto& m : masks)
    for (auto& w : m) w = rng() & rng();  // about a quarter of the bits
  masks[0][0] = ~uint64_t{0};  // mask 0, word 0: every token (not this shard's)
  // fp32 logits as the LM head makes them: bf16 activations times bf16 weights.
  const auto act = Rand(rows * 64, 1.0f, 12), w = Rand(cols * 64, 0.5f, 13);
  Tensor ga = Put(*gpu_, act, rows, 64), ca = Put(cpu_, act, rows, 64);
  Tensor gw = Put(*gpu_, w, cols, 64), cw = Put(cpu_, w, cols, 64);
  Tensor gl = gpu_->AllocOutput(rows, cols), cl = cpu_.AllocOutput(rows, cols);
  gpu_->Linear(ga, gw, nullptr, gl);
  cpu_.Linear(ca, cw, nullptr, cl);
  gpu_->MaskTokens(gl, masks, row_mask, begin);
  cpu_.MaskTokens(cl, masks, row_mask, begin);
  const auto gv = Get(*gpu_, gl), cv = Get(cpu_, cl);
  int64_t masked = 0;
  for (size_t i = 0; i < gv.size(); ++i) {
    ASSERT_EQ(std::isinf(gv[i]), std::isinf(cv[i])) << i;  // the same tokens left out
    if (!std::isinf(cv[i])) {
      ASSERT_NEAR(gv[i], cv[i], 0.05f * (1.0f + std::fabs(cv[i]))) << i;  // bf16 GEMM
    }
    masked += std::isinf(cv[i]) ? 1 : 0;
  }
  EXPECT_GT(masked, rows * cols / 3);  // the check is not vacuous
  EXPECT_LT(masked, rows * cols);
  for (int64_t j = 0; j < cols; ++j) EXPECT_FALSE(std::isinf(cv[static_cast<size_t>(2 * cols + j)]));
}

// The vocab-parallel pick on the device equals FillShardPick / DecideShardPick (model/shard_pick.h)
// and, through them, SampleRow on the assembled row: three ranks' shards of an odd width (1001
// columns, not a multiple of the kernel's chunks), greedy and temperature-only rows, one maximum
// repeated across chunks and ranks (the lowest id wins), one row of -inf.
TEST_F(CudaOpsTest, ShardPickMatchesTheSpecification) {
  const int tp = 3;
  const int64_t rows = 6, shard = 1001;
  std::vector<RowSampling> s(rows);
  for (int64_t r = 0; r < rows; ++r) {
    s[r].params.greedy = r % 2 == 0;
    s[r].params.temperature = 0.7f + 0.2f * static_cast<float>(r);
    s[r].params.seed = 77 + static_cast<uint64_t>(r);
    s[r].counter = 5 * static_cast<uint64_t>(r);
  }
  std::vector<std::vector<float>> logits;
  for (int k = 0; k < tp; ++k) logits.push_back(Rand(rows * shard, 3.0f, 40 + k));
  logits[1][2 * shard + 10] = logits[1][2 * shard + 900] = logits[2][2 * shard + 3] = 50.0f;
  for (auto& l : logits) std::fill_n(l.begin() + 4 * shard, shard, -INFINITY);
  std::vector<float> gsum(rows * tp * 2, 0.0f), csum(rows * tp * 2, 0.0f);
  for (int k = 0; k < tp; ++k) {
    SCOPED_TRACE("rank " + std::to_string(k));
    EmptyStep(*gpu_);
    auto gl = gpu_->OutputFromHost(logits[k].data(), rows, shard);
    auto cl = cpu_.OutputFromHost(logits[k].data(), rows, shard);
    ASSERT_TRUE(gl.ok() && cl.ok());
    Tensor ge = gpu_->AllocOutput(rows, 2 * tp), ce = cpu_.AllocOutput(rows, 2 * tp);
    gpu_->ShardBestScores(*gl, s, k * shard, k, tp, ge);
    cpu_.ShardBestScores(*cl, s, k * shard, k, tp, ce);
    const auto g = Get(*gpu_, ge), c = Get(cpu_, ce);
    for (size_t i = 0; i < g.size(); i += 2) {
      EXPECT_EQ(g[i + 1], c[i + 1]) << "id of slot " << i / 2;
      // Temperature rows add Gumbel noise through logf, which may differ in an ulp on the device.
      if (std::isinf(c[i])) {
        EXPECT_EQ(g[i], c[i]) << "slot " << i / 2;
      } else {
        EXPECT_NEAR(g[i], c[i], 1e-5 * std::abs(c[i])) << "slot " << i / 2;
      }
      gsum[i] += g[i];
      gsum[i + 1] += g[i + 1];
      csum[i] += c[i];
      csum[i + 1] += c[i + 1];
    }
  }
  EmptyStep(*gpu_);
  auto ge = gpu_->OutputFromHost(gsum.data(), rows, 2 * tp);
  auto ce = cpu_.OutputFromHost(csum.data(), rows, 2 * tp);
  ASSERT_TRUE(ge.ok() && ce.ok());
  std::vector<int32_t> gids(rows), cids(rows);
  ASSERT_TRUE(gpu_->ShardPickToHost(*ge, tp, gids.data()).ok());
  ASSERT_TRUE(cpu_.ShardPickToHost(*ce, tp, cids.data()).ok());
  EXPECT_EQ(gids, cids);
  EXPECT_EQ(gids[2], shard + 10);
  EXPECT_EQ(gids[4], 0);
  for (int64_t r = 0; r < rows; ++r) {
    std::vector<float> row;
    for (const auto& l : logits)
      row.insert(row.end(), l.begin() + r * shard, l.begin() + (r + 1) * shard);
    EXPECT_EQ(gids[r], SampleRow(row, s[r])) << "row " << r;
  }
}

struct AttnCase {
  int64_t q_heads, kv_heads, head_dim, window;
  // "fp8 q2 kv1 hd256 window5": the cache's dtype and the shape, for traces.
  std::string Name(KvCacheDtype dtype) const {
    return std::string(KvCacheDtypeName(dtype)) + " q" + std::to_string(q_heads) + " kv" +
           std::to_string(kv_heads) + " hd" + std::to_string(head_dim) + " window" +
           std::to_string(window);
  }
  // Its layer: scale 1/sqrt(144) (query_pre_attn_scalar apart from head_dim), RoPE theta 10000.
  AttentionParams Params(float softcap) const {
    AttentionParams p;
    p.q_heads = q_heads;
    p.kv_heads = kv_heads;
    p.head_dim = head_dim;
    p.scale = 1.0f / std::sqrt(144.0f);
    p.softcap = softcap;
    p.window = window;
    return p;
  }
};

// Both caches: bf16, and FP8 (E4M3 with a scale per position and kv head). Both sides round the
// same fp32 values (k as rotated, before bf16), so only a rotation's last-ulp difference can put a
// value across an E4M3 rounding edge; the bounds stay a little looser for those. Each case prints
// its worst attention row (gpu vs cpu) so the two dtypes' margins can be read side by side.
TEST_F(CudaOpsTest, RopeCacheAndAttentionOverRaggedStepsAndBlocks) {
  // GQA ratios 1, 2, 3 (one head per block), 4 and 8 (two blocks per kv head).
  const std::vector<AttnCase> cases = {{4, 4, 128, 0}, {4, 2, 128, 21}, {8, 2, 128, 16},
                                       {2, 1, 256, 5}, {4, 1, 256, 0},  {6, 2, 128, 33},
                                       {8, 1, 128, 0}, {8, 1, 256, 19}};
  for (const KvCacheDtype dtype : {KvCacheDtype::kAuto, KvCacheDtype::kFp8})
    for (const auto& ac : cases) {
      const bool fp8 = dtype == KvCacheDtype::kFp8;
      const std::string name = ac.Name(dtype);
      SCOPED_TRACE(name);
      double worst = 0;
      auto gpu = NewGpu();
      CpuBackend cpu;  // a pool per case
      ASSERT_NE(gpu, nullptr);
      const int64_t layers = 2, layer = 1;
      const AttentionParams p = ac.Params(50.0f);
      const int64_t width = (ac.q_heads + 2 * ac.kv_heads) * ac.head_dim;
      // Three sequences; steps: ragged prefill, three decode steps, a second prefill chunk, and a
      // decode step whose 341-key context spreads over several attention splits (merged).
      const std::vector<std::vector<int64_t>> steps = {{1, 17, 40}, {1, 1, 1},   {1, 1, 1},
                                                       {1, 1, 1},   {5, 0, 300}, {1, 1, 1}};
      SharedKv kv(*gpu, cpu, layers, ac.kv_heads, ac.head_dim, ac.window, dtype);
      uint64_t seed = 100;
      for (const auto& step : steps) {
        int64_t rows = 0;
        const std::vector<SeqSlice> gs = kv.Step(step, &rows), cs = gs;
        ASSERT_TRUE(gpu->BeginStep(gs, StepOutputKind::kLogits, false).ok());
        const auto qkv = Rand(rows * width, 1.0f, ++seed);
        Tensor gq = Put(*gpu, qkv, rows, width), cq = Put(cpu, qkv, rows, width);
        gpu->RopeAndCacheWrite(gq, gs, layer, p);
        cpu.RopeAndCacheWrite(cq, cs, layer, p);
        ExpectRowsClose(Get(*gpu, gq), Get(cpu, cq), width, fp8 ? 2e-2 : 5e-3, "RoPE");
        Tensor go = gpu->Alloc(rows, ac.q_heads * ac.head_dim),
               co = cpu.Alloc(rows, ac.q_heads * ac.head_dim);
        gpu->Attention(gq, gs, layer, p, go);
        cpu.Attention(cq, cs, layer, p, co);
        worst =
            std::max(worst, ExpectRowsClose(Get(*gpu, go), Get(cpu, co), ac.q_heads * ac.head_dim,
                                            fp8 ? 3e-2 : 2e-2, "Attention"));
      }
      std::printf("[ attention ] %s: worst row %.4f\n", name.c_str(), worst);
      EXPECT_EQ(kv.len[2], 344);
      // The sliding-window layer holds only the blocks the last step's query (at 343) could reach.
      if (ac.window > 0) {
        const auto t = kv.tables.table(2, KvGroup::kSliding);
        EXPECT_EQ(std::count_if(t.begin(), t.end(), [](int32_t b) { return b >= 0; }),
                  343 / 16 - (343 - ac.window + 1) / 16 + 1);
      }
    }
}

// Prefix copies (one kernel over every block and layer slot) leave the cache as the cpu's block by
// block copies do: new sequences that start from copied prefixes attend like the specification.
TEST_F(CudaOpsTest, KvBlockCopiesMatchTheSpecification) {
  for (const KvCacheDtype dtype : {KvCacheDtype::kAuto, KvCacheDtype::kFp8})
    for (int64_t window : {0, 21}) {
      SCOPED_TRACE(std::string(KvCacheDtypeName(dtype)) + " window " + std::to_string(window));
      auto gpu = NewGpu();
      CpuBackend cpu;
      ASSERT_NE(gpu, nullptr);
      AttentionParams p;
      p.q_heads = 4;
      p.kv_heads = 2;
      p.head_dim = 128;
      p.scale = 1.0f / std::sqrt(128.0f);
      p.softcap = 50.0f;
      p.rope_theta = 10000.0;
      const int64_t layers = 2, width = (p.q_heads + 2 * p.kv_heads) * p.head_dim;
      SharedKv kv(*gpu, cpu, layers, p.kv_heads, p.head_dim, window, dtype);
      uint64_t seed = 500;
      // Sequences 0 and 1 fill their caches; then 2 and 3 start from copies of their prefixes
      // (37 positions: two whole blocks and part of a third; 16: exactly one block).
      const std::vector<KvCopy> copies = {{0, 2, 37}, {1, 3, 16}};
      for (int step = 0; step < 2; ++step) {
        int64_t rows = 0;
        const std::vector<SeqSlice> gs =
            step == 0 ? kv.Step({40, 23}, &rows)
                      : kv.Step({1, 0, 1, 2}, &rows, copies, gpu.get(), &cpu);
        const std::vector<SeqSlice> cs = gs;
        ASSERT_TRUE(gpu->BeginStep(gs, StepOutputKind::kLogits, false).ok());
        for (int64_t layer = 0; layer < layers; ++layer) {
          p.window = layer == layers - 1 ? window : 0;
          const auto qkv = Rand(rows * width, 1.0f, ++seed);
          Tensor gq = Put(*gpu, qkv, rows, width), cq = Put(cpu, qkv, rows, width);
          gpu->RopeAndCacheWrite(gq, gs, layer, p);
          cpu.RopeAndCacheWrite(cq, cs, layer, p);
          Tensor go = gpu->Alloc(rows, p.q_heads * p.head_dim),
                 co = cpu.Alloc(rows, p.q_heads * p.head_dim);
          gpu->Attention(gq, gs, layer, p, go);
          cpu.Attention(cq, cs, layer, p, co);
          ExpectRowsClose(Get(*gpu, go), Get(cpu, co), p.q_heads * p.head_dim,
                          dtype == KvCacheDtype::kFp8 ? 3e-2 : 2e-2,
                          "step " + std::to_string(step) + " layer " + std::to_string(layer));
        }
      }
      EXPECT_EQ(kv.len[2], 38);
      EXPECT_EQ(kv.len[3], 18);
    }
}

// Device sampling draws exactly what SampleRow specifies from the same logits: greedy rows, and
// temperature / top-k / top-p rows over a Gemma-sized vocabulary, many seeds and counters.
TEST_F(CudaOpsTest, SamplingMatchesTheSpecification) {
  const int64_t rows = 12, vocab = 256000, k = 64;
  const auto x = Rand(rows * k, 1.0f, 31), w = Rand(vocab * k, 0.3f, 32);
  auto step = [&](std::span<const RowSampling> s, StepOutputKind kind, std::vector<int32_t>* ids,
                  std::vector<float>* logits) {
    ASSERT_TRUE(gpu_->BeginStep({}, kind, false).ok());
    Tensor gx = Put(*gpu_, x, rows, k), gw = Put(*gpu_, w, vocab, k);
    Tensor gl = gpu_->AllocOutput(rows, vocab);
    gpu_->Linear(gx, gw, nullptr, gl);
    gpu_->Softcap(gl, 30.0f);
    *logits = Get(*gpu_, gl);
    ids->resize(rows);
    ASSERT_TRUE(gpu_->SampleToHost(gl, s, ids->data()).ok());
  };
  std::vector<RowSampling> s(rows);
  for (int64_t r = 0; r < rows; ++r) {
    s[r].counter = static_cast<uint64_t>(r * 7);
    s[r].params.greedy = r % 4 == 0;
    s[r].params.temperature = 0.5f + 0.25f * static_cast<float>(r % 3);
    s[r].params.top_k = r % 3 == 1 ? 40 : 0;
    s[r].params.top_p = r % 2 == 1 ? 0.9f : 1.0f;
    s[r].params.seed = 1000 + static_cast<uint64_t>(r);
  }
  std::vector<int32_t> ids;
  std::vector<float> logits;
  step(s, StepOutputKind::kSampledIds, &ids, &logits);
  for (int64_t r = 0; r < rows; ++r) {
    EXPECT_EQ(ids[r], SampleRow({logits.data() + r * vocab, static_cast<size_t>(vocab)}, s[r]))
        << r;
  }
}

// Fresh prefills of 64 tokens or more take the tensor-core paths (head_dim 128: the fused flash
// kernel; 256: two matrix products per head and a masked softmax); a decode step after them reads
// the cache those steps wrote. Windows start inside and across 64-key tiles; GQA 1/2/3/4.
TEST_F(CudaOpsTest, FreshPrefillAttentionOnTensorCores) {
  const std::vector<AttnCase> cases = {{4, 4, 128, 0},   {4, 2, 128, 21}, {8, 2, 128, 16},
                                       {6, 2, 128, 100}, {2, 2, 128, 64}, {2, 1, 256, 70},
                                       {4, 1, 256, 0}};
  for (const KvCacheDtype dtype : {KvCacheDtype::kAuto, KvCacheDtype::kFp8})
    for (const auto& ac : cases) {
      SCOPED_TRACE(ac.Name(dtype));
      auto gpu = NewGpu();
      CpuBackend cpu;  // a pool per case
      ASSERT_NE(gpu, nullptr);
      // Scores here are O(1): a cap of 5 bends them visibly. (Large inputs would make the softmax
      // so peaked that the bf16 rounding of rotated q and k, which both sides do not share,
      // dominates the comparison; the whole-model references cover the real cap of 50 with real
      // scores.)
      const AttentionParams p = ac.Params(5.0f);
      const int64_t width = (ac.q_heads + 2 * ac.kv_heads) * ac.head_dim;
      SharedKv kv(*gpu, cpu, 1, ac.kv_heads, ac.head_dim, ac.window, dtype);
      // Two fresh prefills in one step, a decode step on both, then a fresh 300-token prefill.
      const std::vector<std::vector<int64_t>> steps = {{64, 131, 0}, {1, 1, 0}, {0, 0, 300}};
      uint64_t seed = 500;
      for (const auto& step : steps) {
        int64_t rows = 0;
        const std::vector<SeqSlice> gs = kv.Step(step, &rows), cs = gs;
        ASSERT_TRUE(gpu->BeginStep(gs, StepOutputKind::kLogits, false).ok());
        const auto qkv = Rand(rows * width, 1.0f, ++seed);
        Tensor gq = Put(*gpu, qkv, rows, width), cq = Put(cpu, qkv, rows, width);
        gpu->RopeAndCacheWrite(gq, gs, 0, p);
        cpu.RopeAndCacheWrite(cq, cs, 0, p);
        Tensor go = gpu->Alloc(rows, ac.q_heads * ac.head_dim),
               co = cpu.Alloc(rows, ac.q_heads * ac.head_dim);
        gpu->Attention(gq, gs, 0, p, go);
        cpu.Attention(cq, cs, 0, p, co);
        ExpectRowsClose(Get(*gpu, go), Get(cpu, co), ac.q_heads * ac.head_dim,
                        dtype == KvCacheDtype::kFp8 ? 3e-2 : 2e-2, "Attention");
      }
    }
}

// A pool sized in bytes (4 blocks of 16 positions, 2 layers); a step whose new position has no
// block in its table, or a block past the pool, is refused before any kernel runs.
TEST_F(CudaOpsTest, UnmappedKvPositionsAreAnErrorNotACrash) {
  BackendOptions o;
  o.name = "cuda";
  o.kv_cache_bytes = 2 * 2 * 1 * 16 * 128 * 2 * 4;
  auto b = MakeBackend(o);
  ASSERT_TRUE(b.ok());
  const std::vector<KvGroup> groups = {KvGroup::kFull, KvGroup::kFull};
  auto made = (*b)->CreateKvPool(groups, 1, 128, 16, 0, KvCacheDtype::kAuto);
  ASSERT_TRUE(made.ok()) << made.status().ToString();
  EXPECT_EQ(*made, 4);
  std::vector<int32_t> table(512, -1);
  table[0] = 3;
  table[1] = 0;
  table[2] = 1;
  table[3] = 2;
  std::vector<SeqSlice> s = {{{table, {}}, 0, 64, 0}};
  EXPECT_TRUE((*b)->BeginStep(s, StepOutputKind::kLogits, false).ok());
  s = {{{table, {}}, 64, 1, 0}};
  Status st = (*b)->BeginStep(s, StepOutputKind::kLogits, false);
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.message().find("logical KV block 4 of group 0 is not mapped"), std::string::npos)
      << st.message();
  table[4] = 4;  // past the pool
  st = (*b)->BeginStep(s, StepOutputKind::kLogits, false);
  EXPECT_FALSE(st.ok());
}

TEST_F(CudaOpsTest, WeightStagerStreamsRowsThroughItsBuffersInOrder) {
  // Buffers of 4 KB hold 40 rows of 100 bytes: 1000 rows take 25 fills over 3 buffers.
  auto stager = WeightStager::Create(4096);
  ASSERT_TRUE(stager.ok()) << stager.status().ToString();
  constexpr int64_t kRows = 1000, kRowBytes = 100;
  void* dev = nullptr;
  ASSERT_EQ(cudaMalloc(&dev, 2 * kRows * kRowBytes), cudaSuccess);
  ASSERT_EQ(cudaMemset(dev, 0xff, 2 * kRows * kRowBytes), cudaSuccess);  // poison
  auto byte = [](int64_t row, int64_t i, int weight) {
    return static_cast<uint8_t>((row * 7 + i * 3 + weight * 11) % 251);
  };
  int64_t next_row = 0, fills = 0;
  for (int weight = 0; weight < 2; ++weight) {
    next_row = 0;
    const Status st = (*stager)->Copy(
        static_cast<uint8_t*>(dev) + weight * kRows * kRowBytes, kRows, kRowBytes,
        [&](int64_t r0, int64_t r1, void* dst) {
          EXPECT_EQ(r0, next_row);  // consecutive ranges, each within one buffer
          EXPECT_LE((r1 - r0) * kRowBytes, 4096);
          next_row = r1;
          ++fills;
          for (int64_t r = r0; r < r1; ++r) {
            for (int64_t i = 0; i < kRowBytes; ++i)
              static_cast<uint8_t*>(dst)[(r - r0) * kRowBytes + i] = byte(r, i, weight);
          }
          return OkStatus();
        });
    ASSERT_TRUE(st.ok()) << st.ToString();
    EXPECT_EQ(next_row, kRows);
  }
  ASSERT_TRUE((*stager)->Finish().ok());
  EXPECT_EQ(fills, 50);
  std::vector<uint8_t> host(2 * kRows * kRowBytes);
  ASSERT_EQ(cudaMemcpy(host.data(), dev, host.size(), cudaMemcpyDeviceToHost), cudaSuccess);
  int64_t wrong = 0;
  for (int weight = 0; weight < 2; ++weight) {
    for (int64_t r = 0; r < kRows; ++r) {
      for (int64_t i = 0; i < kRowBytes; ++i)
        wrong += host[(weight * kRows + r) * kRowBytes + i] != byte(r, i, weight);
    }
  }
  EXPECT_EQ(wrong, 0);

  // A failing fill stops the copy with its own error; a row wider than a buffer is refused.
  const Status failed = (*stager)->Copy(dev, kRows, kRowBytes, [](int64_t, int64_t, void*) {
    return DataLoss("shard 3 is truncated");
  });
  EXPECT_NE(failed.message().find("shard 3 is truncated"), std::string::npos) << failed.ToString();
  const Status wide =
      (*stager)->Copy(dev, 1, 5000, [](int64_t, int64_t, void*) { return OkStatus(); });
  EXPECT_EQ(wide.code(), StatusCode::kInvalidArgument) << wide.ToString();
  ASSERT_EQ(cudaFree(dev), cudaSuccess);
}

TEST_F(CudaOpsTest, WeightStagerFillsLargeRowsFromSeveralThreads) {
  // Rows of 1 MiB in buffers of 8: each buffer's fill is split over threads; every row must be
  // written exactly once and land where it belongs.
  auto stager = WeightStager::Create(size_t{8} << 20);
  ASSERT_TRUE(stager.ok()) << stager.status().ToString();
  constexpr int64_t kRows = 40, kRowBytes = int64_t{1} << 20;
  void* dev = nullptr;
  ASSERT_EQ(cudaMalloc(&dev, kRows * kRowBytes), cudaSuccess);
  std::vector<std::atomic<int>> written(kRows);
  std::mutex mu;
  std::set<std::thread::id> threads;
  const Status st = (*stager)->Copy(dev, kRows, kRowBytes, [&](int64_t r0, int64_t r1, void* dst) {
    {
      std::lock_guard<std::mutex> lock(mu);
      threads.insert(std::this_thread::get_id());
    }
    for (int64_t r = r0; r < r1; ++r) {
      written[static_cast<size_t>(r)]++;
      std::memset(static_cast<uint8_t*>(dst) + (r - r0) * kRowBytes, static_cast<int>(r + 1),
                  kRowBytes);
    }
    return OkStatus();
  });
  ASSERT_TRUE(st.ok()) << st.ToString();
  ASSERT_TRUE((*stager)->Finish().ok());
  EXPECT_GT(threads.size(), 1u);
  std::vector<uint8_t> host(kRows * kRowBytes);
  ASSERT_EQ(cudaMemcpy(host.data(), dev, host.size(), cudaMemcpyDeviceToHost), cudaSuccess);
  for (int64_t r = 0; r < kRows; ++r) {
    EXPECT_EQ(written[static_cast<size_t>(r)].load(), 1) << "row " << r;
    const uint8_t* row = host.data() + r * kRowBytes;
    EXPECT_EQ(std::count(row, row + kRowBytes, static_cast<uint8_t>(r + 1)), kRowBytes) << r;
  }
  ASSERT_EQ(cudaFree(dev), cudaSuccess);
}

}  // namespace
}  // namespace gemma2
