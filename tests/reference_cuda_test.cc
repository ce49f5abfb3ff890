// The cuda engine (bf16) against the Hugging Face fp32 references: every logits row within 2e-2
// relative L2, identical greedy tokens wherever the reference's top-2 margin exceeds 0.1.
// Only cases with Gemma 2's head sizes (128, 256) run: the kernels support no others.
//
// Tolerance: bf16 keeps 8 significant bits (relative rounding 2^-9 = 2e-3 per value); a few
// layers of rounded activations compound to ~5e-3 in the logits, so 2e-2 passes bf16 noise and
// fails any formula error (those reach 3e-2 and beyond, see reference_test.cc).
#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>

#include "engine/engine.h"
#include "engine/generate.h"
#include "tests/gpu_util.h"
#include "tests/reference_util.h"

namespace gemma2 {
namespace {

// A CASE_fp8 directory of tools/make_references.py (an FP8 checkpoint and its anchors' worst rows).
bool IsFp8AnchorCase(const std::filesystem::path& dir) {
  return testing::ReferenceMetadata(dir).count("fp8_anchor_worst") > 0;
}

// Every reference case with a head size the kernels take, through the cuda engine.
void CheckCudaCases(Quantization quantization, double tol, double token_margin,
                    KvCacheDtype kv_cache_dtype = KvCacheDtype::kAuto) {
  int ran = 0;
  for (const auto& dir : testing::ReferenceCaseDirs()) {
    if (IsFp8AnchorCase(dir)) continue;  // Fp8CheckpointsWithinTheirTransformersAnchors
    auto ck = Checkpoint::Open(dir);
    ASSERT_TRUE(ck.ok()) << ck.status().ToString();
    const int64_t hd = (*ck)->config().head_dim;
    if (hd != 128 && hd != 256) continue;
    EngineOptions o;
    o.backend.name = "cuda";
    o.backend.kv_cache_bytes = int64_t{1} << 30;
    o.backend.poison_scratch = true;  // unwritten elements would show as NaN
    o.quantization = quantization;
    o.kv_cache_dtype = kv_cache_dtype;
    testing::CheckReferenceCase(dir, o, tol, token_margin);
    ++ran;
  }
  EXPECT_GE(ran, 1) << "no reference case with head_dim 128 or 256";
}

TEST(ReferenceCudaTest, MatchesTransformersInBf16) {
  GEMMA2_REQUIRE_GPU();
  CheckCudaCases(Quantization::kNone, 2e-2, /*token_margin=*/0.1);
}

// FP8 weights on the GPU (the GEMV for decode, the FP8 GEMM with per-token activation scales for
// prefill) against the same references, held to the bound the cpu specification meets
// (reference_test Fp8WeightsStayNearTransformersFp32); the worst rows are printed for both.
TEST(ReferenceCudaTest, Fp8WeightsStayNearTransformersFp32) {
  GEMMA2_REQUIRE_GPU();
  CheckCudaCases(Quantization::kFp8, 0.12, /*token_margin=*/0.1);
}

// The FP8 KV cache on the GPU (E4M3 written by the RoPE kernel, read by the paged decode kernel;
// fresh prefills read the rounded rows), alone and on top of FP8 weights, held to the bound the
// cpu specification meets (reference_test Fp8KvCacheStaysNearTransformersFp32).
TEST(ReferenceCudaTest, Fp8KvCacheStaysNearTransformersFp32) {
  GEMMA2_REQUIRE_GPU();
  CheckCudaCases(Quantization::kNone, 0.12, /*token_margin=*/0.1, KvCacheDtype::kFp8);
  CheckCudaCases(Quantization::kFp8, 0.12, /*token_margin=*/0.1, KvCacheDtype::kFp8);
}

// Issue 16's numerics on its two shapes (tools/make_references.py --only 27b_widths_3layers,
// hd256_window64, made on the GPU host: gigabytes, not committed; skipped without them). The
// anchor is transformers running the same FP8 weights dequantized, in bf16, against the fp32
// logits. The FP8 checkpoint as transformers saved it: worst row within 1.1x of the anchor; the
// bf16 checkpoint quantized at load (--quantization fp8, our per-row scales): within 1.25x; the
// FP8 KV cache on top: within 1.25x of that. Greedy tokens equal wherever the fp32 top-2 margin
// exceeds 0.05, over 48 decoded tokens.
TEST(ReferenceCudaTest, Fp8CheckpointsWithinTheirTransformersAnchors) {
  GEMMA2_REQUIRE_GPU();
  int ran = 0;
  for (const auto& dir : testing::ReferenceCaseDirs()) {
    if (!IsFp8AnchorCase(dir)) continue;
    const auto meta = testing::ReferenceMetadata(dir);
    const double anchor = std::stod(meta.at("fp8_anchor_worst"));
    const std::filesystem::path base = dir.parent_path() / meta.at("base_case");
    EngineOptions o;
    o.backend.name = "cuda";
    o.backend.kv_cache_bytes = int64_t{4} << 30;
    o.quantization = Quantization::kFp8;
    double saved = -1, online = -1, with_kv = -1;
    testing::CheckReferenceCase(dir, o, 0.5, /*token_margin=*/0.05, &saved);
    testing::CheckReferenceCase(base, o, 0.5, /*token_margin=*/0.05, &online);
    o.kv_cache_dtype = KvCacheDtype::kFp8;
    testing::CheckReferenceCase(base, o, 0.5, /*token_margin=*/0.05, &with_kv);
    std::printf("[ fp8 anchor ] %s: transformers bf16 on the FP8 weights %.4f (bf16 weights %s); "
                "ours: FP8 checkpoint %.4f (%.2fx), --quantization fp8 %.4f (%.2fx), + FP8 KV "
                "cache %.4f (%.2fx of that)\n",
                dir.filename().c_str(), anchor, meta.at("bf16_anchor_worst").c_str(), saved,
                saved / anchor, online, online / anchor, with_kv, with_kv / online);
    EXPECT_GE(saved, 0);
    EXPECT_LE(saved, 1.1 * anchor);
    EXPECT_LE(online, 1.25 * anchor);
    EXPECT_LE(with_kv, 1.25 * online);
    ++ran;
  }
  if (ran == 0) GTEST_SKIP() << "no FP8 anchor case (tools/make_references.py --only 27b_widths_3layers,hd256_window64)";
}

TEST(ReferenceCudaTest, RefusesOtherHeadSizesClearly) {
  GEMMA2_REQUIRE_GPU();
  for (const auto& dir : testing::ReferenceCaseDirs()) {
    auto ck = Checkpoint::Open(dir);
    ASSERT_TRUE(ck.ok());
    if ((*ck)->config().head_dim == 128 || (*ck)->config().head_dim == 256) continue;
    EngineOptions o;
    o.backend.name = "cuda";
    o.backend.kv_cache_bytes = int64_t{1} << 28;
    auto e = Engine::Create(**ck, o);
    ASSERT_TRUE(e.ok()) << e.status().ToString();
    StepPlan plan;
    const int64_t id = (*e)->NewSequence();
    plan.sequences.push_back({id, 0, {2, 3}, {1}});
    auto out = (*e)->Step(plan);
    ASSERT_FALSE(out.ok());
    EXPECT_NE(out.status().message().find("head_dim 128 and 256"), std::string::npos)
        << out.status().message();
    return;
  }
}

}  // namespace
}  // namespace gemma2

namespace gemma2 {
namespace {

// Greedy decoding replayed from captured CUDA graphs gives the same tokens as eager launches and
// as the logits path, across batch sizes and growing contexts (block boundaries included).
// With the bf16 cache and the FP8 one (its scales and E4M3 reads inside the captured graphs).
TEST(CudaGraphTest, ReplayedDecodeEqualsEagerDecode) {
  GEMMA2_REQUIRE_GPU();
  const auto dir = std::filesystem::path(GEMMA2_SOURCE_DIR) / "tests/data/references/hd128_27b_like";
  auto ck = Checkpoint::Open(dir);
  ASSERT_TRUE(ck.ok()) << ck.status().ToString();
  std::vector<GenerationRequest> reqs;
  for (int64_t len : {5, 17, 40}) {
    GenerationRequest r;
    for (int64_t i = 0; i < len; ++i) r.prompt.push_back(static_cast<int32_t>(2 + (i * 37) % 500));
    r.max_new_tokens = 24;
    r.ignore_eos = true;
    reqs.push_back(r);
  }
  for (const KvCacheDtype dtype : {KvCacheDtype::kAuto, KvCacheDtype::kFp8}) {
    SCOPED_TRACE(std::string("kv cache ") + std::string(KvCacheDtypeName(dtype)));
    std::vector<std::vector<int32_t>> results[3];
    for (int mode = 0; mode < 3; ++mode) {  // graphs, eager, logits path
      EngineOptions o;
      o.backend.name = "cuda";
      o.backend.kv_cache_bytes = int64_t{1} << 30;
      o.backend.cuda_graphs = mode == 0;
      o.kv_cache_dtype = dtype;
      auto e = Engine::Create(**ck, o);
      ASSERT_TRUE(e.ok()) << e.status().ToString();
      auto batch = reqs;
      for (auto& r : batch) r.return_logits = mode == 2;
      for (int round = 0; round < 2; ++round) {  // the second round replays the captured graphs
        auto res = Generate(**e, batch);
        ASSERT_TRUE(res.ok()) << res.status().ToString();
        for (const auto& g : *res) results[mode].push_back(g.generated);
      }
      auto single = Generate(**e, {batch[1]});  // another batch size
      ASSERT_TRUE(single.ok()) << single.status().ToString();
      results[mode].push_back((*single)[0].generated);
    }
    EXPECT_EQ(results[0], results[1]);
    EXPECT_EQ(results[0], results[2]);
  }
}

}  // namespace
}  // namespace gemma2
