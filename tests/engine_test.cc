// The engine's invariants: tp N equals tp 1, batching equals one-at-a-time, decoding with the KV
// cache equals recomputing from scratch, and bad step plans are refused.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <random>

#include "engine/engine.h"
#include "engine/generate.h"
#include "model/random_checkpoint.h"
#include "model/sampling.h"
#include "tests/reference_util.h"
#include "tests/test_files.h"

namespace gemma2 {
namespace {

using testing::RelativeL2;

// 8 q heads / 2 kv heads: tp 2 splits kv heads, tp 4 and 8 replicate them.
ModelConfig SmallGqa(Architecture arch = Architecture::kCausalLM) {
  ModelConfig c;
  c.architecture = arch;
  c.vocab_size = 97;  // odd: the vocab-parallel split is uneven
  c.hidden_size = 32;
  c.intermediate_size = 64;
  c.num_layers = 3;
  c.num_heads = 8;
  c.num_kv_heads = 2;
  c.head_dim = 8;
  c.query_pre_attn_scalar = 11;
  c.sliding_window = 5;
  c.max_position_embeddings = 64;
  c.layer_is_sliding = {true, false, true};
  if (arch != Architecture::kCausalLM) {
    c.num_labels = 4;
    c.id2label = {"w", "x", "y", "z"};
  }
  return c;
}

class EngineTest : public ::testing::Test {
 protected:
  void Make(const ModelConfig& c) {
    RandomCheckpointOptions o;
    o.seed = 11;
    o.weight_std = 0.3f;
    ASSERT_TRUE(WriteRandomCheckpoint(c, dir_.path(), o).ok());
    auto ck = Checkpoint::Open(dir_.path());
    ASSERT_TRUE(ck.ok()) << ck.status().ToString();
    ck_ = std::move(ck).value();
  }
  std::unique_ptr<Engine> NewEngine(int tp) {
    auto e = Engine::Create(*ck_, {"cpu", tp, 1});
    EXPECT_TRUE(e.ok()) << e.status().ToString();
    if (e.ok()) {
      EXPECT_EQ((*e)->tp(), tp);  // {"cpu", tp, threads}: the backend, then tp
    }
    return e.ok() ? std::move(e).value() : nullptr;
  }
  testing::TempDir dir_;
  std::unique_ptr<Checkpoint> ck_;
};

GenerationRequest Req(std::vector<int32_t> prompt, int64_t n) {
  GenerationRequest r;
  r.prompt = std::move(prompt);
  r.max_new_tokens = n;
  r.ignore_eos = true;
  r.return_logits = true;
  return r;
}

void ExpectSameRows(const std::vector<std::vector<float>>& a,
                    const std::vector<std::vector<float>>& b, double tol) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t r = 0; r < a.size(); ++r) {
    ASSERT_EQ(a[r].size(), b[r].size());
    EXPECT_LE(RelativeL2(a[r].data(), b[r].data(), static_cast<int64_t>(a[r].size())), tol)
        << "row " << r;
  }
}

TEST_F(EngineTest, TensorParallelEqualsSingleRank) {
  Make(SmallGqa());
  const std::vector<GenerationRequest> reqs = {Req({2, 5, 9, 14, 3, 77, 96, 40, 41, 42, 43}, 9),
                                               Req({2, 60}, 5)};
  auto base = Generate(*NewEngine(1), reqs);
  ASSERT_TRUE(base.ok()) << base.status().ToString();
  for (int tp : {2, 4, 8}) {
    SCOPED_TRACE("tp=" + std::to_string(tp));
    auto res = Generate(*NewEngine(tp), reqs);
    ASSERT_TRUE(res.ok()) << res.status().ToString();
    for (size_t i = 0; i < reqs.size(); ++i) {
      EXPECT_EQ((*res)[i].generated, (*base)[i].generated);
      ExpectSameRows((*res)[i].logits, (*base)[i].logits, 1e-5);
    }
  }
}

// --quantization fp8 on the cpu backend (the specification: dequantized E4M3 with per-row scales,
// run in fp32): close to the fp32 model (E4M3 keeps 3 mantissa bits) but not equal to it, with
// the scales of each rank's own slice at tp 2.
TEST_F(EngineTest, Fp8WeightsStayCloseToFp32) {
  Make(SmallGqa());
  const std::vector<GenerationRequest> reqs = {Req({2, 5, 9, 14, 3, 77, 96, 40, 41, 42, 43}, 6)};
  auto base = Generate(*NewEngine(1), reqs);
  ASSERT_TRUE(base.ok());
  for (int tp : {1, 2}) {
    EngineOptions o{{"cpu"}, tp, 1};
    o.quantization = Quantization::kFp8;
    auto e = Engine::Create(*ck_, o);
    ASSERT_TRUE(e.ok()) << e.status().ToString();
    auto res = Generate(**e, reqs);
    ASSERT_TRUE(res.ok());
    const auto& a = (*res)[0].logits;
    const auto& b = (*base)[0].logits;
    double worst = 0;  // over the prompt's rows: the same tokens on both sides
    for (size_t r = 0; r < reqs[0].prompt.size(); ++r)
      worst = std::max(worst, RelativeL2(a[r].data(), b[r].data(), static_cast<int64_t>(a[r].size())));
    EXPECT_GT(worst, 1e-4) << "tp " << tp << ": the weights were not quantized";
    EXPECT_LT(worst, 0.15) << "tp " << tp;
  }
}

// --kv-cache-dtype fp8 on the cpu backend (the specification: keys and values rounded through
// E4M3 with a scale per position and kv head as they are written): close to the fp32 cache but
// not equal; the same at tp 2 (kv heads split) and 4 (replicated), since a head's scale is its
// own; and decoding through the rounded cache equals one prefill over the same tokens.
TEST_F(EngineTest, Fp8KvCacheStaysCloseAndEqualAcrossTpAndRecompute) {
  Make(SmallGqa());
  const std::vector<GenerationRequest> reqs = {Req({2, 5, 9, 14, 3, 77, 96, 40, 41, 42, 43}, 7),
                                               Req({2, 60, 61}, 4)};
  auto base = Generate(*NewEngine(1), reqs);
  ASSERT_TRUE(base.ok());
  auto fp8_engine = [&](int tp) {
    EngineOptions o{{"cpu"}, tp, 1};
    o.kv_cache_dtype = KvCacheDtype::kFp8;
    auto e = Engine::Create(*ck_, o);
    EXPECT_TRUE(e.ok()) << e.status().ToString();
    return e.ok() ? std::move(e).value() : nullptr;
  };
  auto one = fp8_engine(1);
  auto fp8 = Generate(*one, reqs);
  ASSERT_TRUE(fp8.ok()) << fp8.status().ToString();
  const auto& a = (*fp8)[0].logits;
  const auto& b = (*base)[0].logits;
  double worst = 0;  // over the prompt's rows: the same tokens on both sides
  for (size_t r = 0; r < reqs[0].prompt.size(); ++r)
    worst =
        std::max(worst, RelativeL2(a[r].data(), b[r].data(), static_cast<int64_t>(a[r].size())));
  EXPECT_GT(worst, 1e-4) << "the cache was not rounded";
  EXPECT_LT(worst, 0.05);
  for (int tp : {2, 4}) {
    auto res = Generate(*fp8_engine(tp), reqs);
    ASSERT_TRUE(res.ok());
    for (size_t i = 0; i < reqs.size(); ++i) {
      EXPECT_EQ((*res)[i].generated, (*fp8)[i].generated) << "tp " << tp;
      ExpectSameRows((*res)[i].logits, (*fp8)[i].logits, 1e-5);
    }
  }
  for (size_t i = 0; i < reqs.size(); ++i) {
    GenerationRequest full = reqs[i];
    const auto& gen = (*fp8)[i].generated;
    full.prompt.insert(full.prompt.end(), gen.begin(), gen.end() - 1);
    full.max_new_tokens = 1;
    auto re = Generate(*one, {full});
    ASSERT_TRUE(re.ok());
    ExpectSameRows((*re)[0].logits, (*fp8)[i].logits, 1e-5);
  }
  EXPECT_FALSE(ParseKvCacheDtype("fp8_e5m2").ok());
  EXPECT_NE(ParseKvCacheDtype("int8").status().message().find("--kv-cache-dtype"),
            std::string::npos);
}

// An FP8 checkpoint as transformers saves it (E4M3, 16 x 16 block scales: blocks cut across the
// heads and the MLP slices) runs as its dequantized weights in fp32 do, at every tp: the loader
// scales each slice by its own blocks.
TEST_F(EngineTest, Fp8CheckpointEqualsItsDequantizedWeightsAtEveryTp) {
  ModelConfig c = SmallGqa();
  c.hidden_size = 64;
  c.intermediate_size = 96;
  for (auto kind : {Fp8Scheme::Kind::kBlock, Fp8Scheme::Kind::kChannel}) {
    SCOPED_TRACE(static_cast<int>(kind));
    testing::TempDir fp8_dir, ref_dir;
    RandomCheckpointOptions o;
    o.seed = 11;
    o.weight_std = 0.3f;
    o.fp8.kind = kind;
    o.fp8.block_rows = o.fp8.block_cols = 16;
    ASSERT_TRUE(WriteRandomCheckpoint(c, fp8_dir.path(), o).ok());
    o.fp8_dequantized = true;
    o.dtype = DType::kF32;
    ASSERT_TRUE(WriteRandomCheckpoint(c, ref_dir.path(), o).ok());
    auto fp8 = Checkpoint::Open(fp8_dir.path());
    auto ref = Checkpoint::Open(ref_dir.path());
    ASSERT_TRUE(fp8.ok() && ref.ok()) << fp8.status().ToString();
    const std::vector<GenerationRequest> reqs = {Req({2, 5, 9, 14, 3, 77, 96, 40}, 6)};
    auto want = Generate(**Engine::Create(**ref, {"cpu", 1, 1}), reqs);
    ASSERT_TRUE(want.ok());
    for (int tp : {1, 2, 4}) {
      auto e = Engine::Create(**fp8, {"cpu", tp, 1});
      ASSERT_TRUE(e.ok()) << e.status().ToString();
      auto got = Generate(**e, reqs);
      ASSERT_TRUE(got.ok());
      EXPECT_EQ((*got)[0].generated, (*want)[0].generated) << "tp " << tp;
      ExpectSameRows((*got)[0].logits, (*want)[0].logits, 1e-4);
    }
  }
}

TEST_F(EngineTest, BatchEqualsOneAtATimeAndCacheEqualsRecompute) {
  Make(SmallGqa());
  auto engine = NewEngine(1);
  const std::vector<GenerationRequest> reqs = {Req({2, 8, 8, 8, 30, 31}, 7), Req({2, 1, 50}, 3),
                                               Req({2, 90, 91, 92, 93, 94, 95, 12, 13}, 1)};
  auto batch = Generate(*engine, reqs);
  ASSERT_TRUE(batch.ok()) << batch.status().ToString();
  for (size_t i = 0; i < reqs.size(); ++i) {
    auto alone = Generate(*engine, {reqs[i]});
    ASSERT_TRUE(alone.ok());
    EXPECT_EQ((*alone)[0].generated, (*batch)[i].generated);
    ExpectSameRows((*alone)[0].logits, (*batch)[i].logits, 1e-6);
    // One prefill over prompt + generated[:-1] gives the rows decoding produced step by step.
    GenerationRequest full = reqs[i];
    const auto& gen = (*batch)[i].generated;
    full.prompt.insert(full.prompt.end(), gen.begin(), gen.end() - 1);
    full.max_new_tokens = 1;
    auto re = Generate(*engine, {full});
    ASSERT_TRUE(re.ok());
    ExpectSameRows((*re)[0].logits, (*batch)[i].logits, 1e-5);
  }
}

TEST_F(EngineTest, StopsAtEndOfSequenceUnlessIgnored) {
  Make(SmallGqa());
  auto probe = Generate(*NewEngine(1), {Req({2, 5, 6}, 4)});
  ASSERT_TRUE(probe.ok());
  EXPECT_EQ((*probe)[0].finish_reason, "length");
  ASSERT_EQ((*probe)[0].generated.size(), 4u);
  EXPECT_EQ((*probe)[0].logits.size(), 3u + 4u - 1u);
  // Declare the last greedy token an end-of-sequence token: generation must stop where it first
  // appears.
  const auto& gen = (*probe)[0].generated;
  const int32_t eos = gen.back();
  const auto first = std::find(gen.begin(), gen.end(), eos);
  ModelConfig c = ck_->config();
  c.eos_token_ids = {eos};
  std::ofstream(dir_.path() / "config.json") << ModelConfigToJson(c);
  auto ck = Checkpoint::Open(dir_.path());
  ASSERT_TRUE(ck.ok());
  auto engine = Engine::Create(**ck, {"cpu", 1, 1});
  auto ignored = Generate(**engine, {Req({2, 5, 6}, 4)});
  ASSERT_TRUE(ignored.ok());
  auto req = Req({2, 5, 6}, 4);
  req.ignore_eos = false;
  auto r = Generate(**engine, {req});
  ASSERT_TRUE(r.ok());
  EXPECT_EQ((*r)[0].finish_reason, "stop");
  EXPECT_EQ((*r)[0].generated, (std::vector<int32_t>(gen.begin(), first + 1)));
  EXPECT_EQ((*ignored)[0].generated, (*probe)[0].generated);  // Req() ignores eos
}

TEST_F(EngineTest, ClassifiersAgreeAcrossTp) {
  for (auto arch : {Architecture::kSequenceClassification, Architecture::kTokenClassification}) {
    testing::TempDir sub;
    RandomCheckpointOptions o;
    o.seed = 5;
    ASSERT_TRUE(WriteRandomCheckpoint(SmallGqa(arch), sub.path(), o).ok());
    auto ck = Checkpoint::Open(sub.path());
    ASSERT_TRUE(ck.ok());
    const std::vector<int32_t> input = {2, 7, 8, 9, 10, 0, 0};  // trailing pad
    auto e1 = Engine::Create(**ck, {"cpu", 1, 1});
    auto base = Classify(**e1, input);
    ASSERT_TRUE(base.ok()) << base.status().ToString();
    EXPECT_EQ(base->logits.size(),
              arch == Architecture::kSequenceClassification ? 1u : input.size());
    for (int tp : {2, 4}) {
      auto e = Engine::Create(**ck, {"cpu", tp, 1});
      auto res = Classify(**e, input);
      ASSERT_TRUE(res.ok());
      ExpectSameRows(res->logits, base->logits, 1e-5);
      EXPECT_EQ(res->labels, base->labels);
    }
    if (arch == Architecture::kSequenceClassification) {
      // The pooled row is the last non-pad token: the same as classifying without the pads.
      auto trimmed = Classify(**e1, {2, 7, 8, 9, 10});
      ExpectSameRows(trimmed->logits, base->logits, 1e-6);
    }
    auto gen = Generate(**e1, {Req({2, 3}, 1)});
    EXPECT_FALSE(gen.ok());
  }
}

TEST_F(EngineTest, RefusesBadPlans) {
  Make(SmallGqa());
  auto engine = NewEngine(2);
  const int64_t id = engine->NewSequence();
  auto step = [&](int64_t seq, int64_t start, std::vector<int32_t> toks) {
    StepPlan p;
    p.sequences.push_back({seq, start, std::move(toks), {0}});
    return engine->Step(p).status();
  };
  EXPECT_NE(step(id, 0, {2, 97}).message().find("outside the vocabulary [0, 97)"),
            std::string::npos);
  EXPECT_FALSE(step(id, 0, {-1}).ok());
  EXPECT_NE(step(id, 3, {2}).message().find("cache holds 0"), std::string::npos);
  EXPECT_NE(step(999, 0, {2}).message().find("does not exist"), std::string::npos);
  EXPECT_FALSE(step(id, 0, {}).ok());
  StepPlan twice;
  twice.sequences = {{id, 0, {2}, {0}}, {id, 0, {3}, {0}}};
  EXPECT_NE(engine->Step(twice).status().message().find("appears twice in one step"),
            std::string::npos);
  EXPECT_NE(step(id, 0, std::vector<int32_t>(65, 3)).message().find("max_position_embeddings 64"),
            std::string::npos);
  EXPECT_TRUE(step(id, 0, {2, 3}).ok());  // the engine is still usable
  EXPECT_EQ(engine->SequenceLength(id), 2);
  auto too_long = Generate(*engine, {Req({2, 3}, 100)});
  ASSERT_FALSE(too_long.ok());
  EXPECT_NE(too_long.status().message().find("exceeds the context of 64"), std::string::npos);
  EXPECT_FALSE(Generate(*engine, {Req({}, 1)}).ok());
  EXPECT_FALSE(Engine::Create(*ck_, {"cpu", 3, 1}).ok());
  EXPECT_FALSE(Engine::Create(*ck_, {"tpu", 1, 1}).ok());
}

}  // namespace
}  // namespace gemma2

namespace gemma2 {
namespace {

// A copied KV prefix continues exactly as the computed one (prefix reuse), on every rank, past
// the sliding window; bad copies are refused before anything runs.
TEST_F(EngineTest, CopiedPrefixContinuesLikeTheComputedOne) {
  Make(SmallGqa());
  auto e = NewEngine(2);
  std::vector<int32_t> prompt;
  for (int i = 0; i < 14; ++i) prompt.push_back(3 + (i * 5) % 90);
  const int64_t a = e->NewSequence(), b = e->NewSequence();
  StepPlan full;
  full.sequences.push_back({a, 0, prompt, {13}, {}});
  auto want = e->Step(full);
  ASSERT_TRUE(want.ok()) << want.status().ToString();
  StepPlan reuse;
  reuse.kv_copies = {{a, b, 9}};
  reuse.sequences.push_back({b, 9, {prompt.begin() + 9, prompt.end()}, {4}, {}});
  auto got = e->Step(reuse);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  EXPECT_LE(RelativeL2(got->row(0), want->row(0), want->width), 1e-6);
  EXPECT_EQ(e->SequenceLength(b), 14);
  StepPlan bad;
  bad.kv_copies = {{a, b, 3}};  // b is not empty any more
  EXPECT_NE(e->Step(bad).status().message().find("not empty"), std::string::npos);
  const int64_t c = e->NewSequence();
  bad.kv_copies = {{a, c, 15}};  // more than a holds
  EXPECT_NE(e->Step(bad).status().message().find("the source holds 14"), std::string::npos);
}

}  // namespace
}  // namespace gemma2

namespace gemma2 {
namespace {

// Top-k / top-p draws picked across vocabulary shards equal the single-rank draws.
TEST_F(EngineTest, TopKTopPDrawsAcrossShardsEqualOneRank) {
  Make(SmallGqa());
  std::vector<GenerationRequest> reqs;
  for (int i = 0; i < 6; ++i) {
    GenerationRequest g;
    g.prompt = {2, static_cast<int32_t>(10 + i), 40, 41};
    g.max_new_tokens = 12;
    g.ignore_eos = true;
    g.sampling.greedy = false;
    g.sampling.temperature = 0.6f + 0.3f * static_cast<float>(i);
    g.sampling.top_k = i % 2 ? 7 : 0;
    g.sampling.top_p = i % 3 ? 0.8f : 1.0f;
    g.sampling.seed = 100 + static_cast<uint64_t>(i);
    reqs.push_back(g);
  }
  auto one = Generate(*NewEngine(1), reqs);
  ASSERT_TRUE(one.ok()) << one.status().ToString();
  for (int tp : {2, 4}) {
    auto many = Generate(*NewEngine(tp), reqs);
    ASSERT_TRUE(many.ok()) << many.status().ToString();
    for (size_t i = 0; i < reqs.size(); ++i)
      EXPECT_EQ((*many)[i].generated, (*one)[i].generated) << tp << " " << i;
  }
}

// Structured output's masks applied by each rank to its own vocabulary columns (the ids-only
// path) pick what masking the whole row and SampleRow pick: greedy, temperature-only (the device
// pick) and top-k / top-p (the host pick across shards), at tp 1, 2 and 4 (97 tokens: shards and
// 64-bit words cross each other); rows share masks, and a row without one draws from everything.
TEST_F(EngineTest, TokenMasksOnTheRanksEqualMaskingTheRow) {
  Make(SmallGqa());
  const ModelConfig& c = ck_->config();
  const int64_t words = TokenMaskWordCount(c.vocab_size);
  std::mt19937_64 rng(5);
  auto random_mask = [&](int keep_percent) {
    TokenMaskWords m(static_cast<size_t>(words), 0);
    for (int64_t t = 0; t < c.vocab_size; ++t)
      if (static_cast<int>(rng() % 100) < keep_percent) m[static_cast<size_t>(t / 64)] |= uint64_t{1} << (t % 64);
    m[0] |= uint64_t{1} << 7;  // never empty
    return m;
  };
  auto allowed = [](const TokenMaskWords& m, int32_t t) { return (m[static_cast<size_t>(t / 64)] >> (t % 64)) & 1; };
  std::vector<SamplingParams> samplings(4);
  samplings[1].greedy = false;
  samplings[1].temperature = 0.8f;
  samplings[2] = samplings[1];
  samplings[2].top_k = 5;
  samplings[3] = samplings[1];
  samplings[3].top_p = 0.7f;
  for (int tp : {1, 2, 4}) {
    auto engine = NewEngine(tp);
    for (size_t k = 0; k < samplings.size(); ++k) {
      const std::vector<TokenMaskWords> masks = {random_mask(30), random_mask(5)};
      const std::vector<int32_t> mask_of = {0, 1, 0, -1};  // rows 0 and 2 share a mask
      StepPlan rows_plan, ids_plan;
      ids_plan.ids_only = true;
      ids_plan.token_masks = masks;
      for (size_t i = 0; i < mask_of.size(); ++i) {
        StepSequence s{0, 0, {2, static_cast<int32_t>(20 + i), static_cast<int32_t>(30 + 7 * k)}, {2}};
        s.sampling.params = samplings[k];
        s.sampling.params.seed = 40 + i;
        s.sampling.counter = 3;
        s.sequence_id = engine->NewSequence();
        rows_plan.sequences.push_back(s);
        s.sequence_id = engine->NewSequence();
        s.token_mask = mask_of[i];
        ids_plan.sequences.push_back(s);
      }
      auto rows = engine->Step(rows_plan);
      ASSERT_TRUE(rows.ok()) << rows.status().ToString();
      auto ids = engine->Step(ids_plan);
      ASSERT_TRUE(ids.ok()) << ids.status().ToString();
      for (size_t i = 0; i < mask_of.size(); ++i) {
        std::vector<float> row(rows->row(static_cast<int64_t>(i)), rows->row(static_cast<int64_t>(i)) + rows->width);
        if (mask_of[i] >= 0) {
          for (int32_t t = 0; t < c.vocab_size; ++t)
            if (!allowed(masks[static_cast<size_t>(mask_of[i])], t)) row[static_cast<size_t>(t)] = -INFINITY;
        }
        const int32_t want = SampleRow(row, ids_plan.sequences[i].sampling);
        EXPECT_EQ(ids->ids[i], want) << "tp " << tp << " sampling " << k << " row " << i;
        if (mask_of[i] >= 0) {
          EXPECT_TRUE(allowed(masks[static_cast<size_t>(mask_of[i])], ids->ids[i]));
        }
      }
    }
  }
  // Masks that cannot be right are refused before anything runs.
  auto engine = NewEngine(2);
  auto refused = [&](StepPlan p) {
    p.sequences.push_back({engine->NewSequence(), 0, {2}, {0}});
    p.sequences.back().token_mask = 0;
    return engine->Step(p).status().message();
  };
  StepPlan short_mask;
  short_mask.ids_only = true;
  short_mask.token_masks = {TokenMaskWords(1, 1)};
  EXPECT_NE(refused(short_mask).find("1 words for a vocabulary of 97"), std::string::npos);
  StepPlan empty = short_mask;
  empty.token_masks = {TokenMaskWords(2, 0)};
  empty.token_masks[0][1] = uint64_t{1} << 40;  // past token 96: not a token
  EXPECT_NE(refused(empty).find("allows no token"), std::string::npos);
  StepPlan rows_back = short_mask;
  rows_back.ids_only = false;
  rows_back.token_masks = {random_mask(50)};
  EXPECT_NE(refused(rows_back).find("returns logits rows"), std::string::npos);
  StepPlan missing;
  missing.ids_only = true;
  EXPECT_NE(refused(missing).find("token mask 0 does not exist"), std::string::npos);
}

}  // namespace
}  // namespace gemma2
