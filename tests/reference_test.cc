// The CPU engine against Hugging Face transformers (tools/make_references.py): every logits row
// within 1e-4 relative L2 and identical greedy tokens, at tp 1 and every tp the model allows.
//
// Tolerance: both sides compute in fp32 from the same bf16-exact parameters; they differ only in
// summation order (BLAS blocking, softmax, fp64 norm sums here), a few fp32 ulps per op, which
// stays near 1e-6 relative after a few layers. 1e-4 leaves room for the softcaps' tanh and long
// prompts while still catching any wrong formula (those show up at 1e-2 or worse).
#include <gtest/gtest.h>

#include "model/generate.h"
#include "tests/reference_util.h"

namespace gemma2 {
namespace {

using testing::LoadReference;
using testing::ReferenceCaseDirs;
using testing::RelativeL2;

constexpr double kTolerance = 1e-4;

void CheckCase(const std::filesystem::path& dir, int tp) {
  SCOPED_TRACE(dir.filename().string() + " tp=" + std::to_string(tp));
  const auto ref = LoadReference(dir);
  auto ck = Checkpoint::Open(dir);
  ASSERT_TRUE(ck.ok()) << ck.status().ToString();
  auto engine = Engine::Create(**ck, {"cpu", tp, 0});
  ASSERT_TRUE(engine.ok()) << engine.status().ToString();
  const ModelConfig& c = (*engine)->config();
  ASSERT_EQ(ref.width, c.output_size());

  std::vector<std::vector<float>> rows;
  if (c.is_classifier()) {
    auto res = Classify(**engine, ref.prompt_ids);
    ASSERT_TRUE(res.ok()) << res.status().ToString();
    rows = res->logits;
  } else {
    GenerationRequest req;
    req.prompt = ref.prompt_ids;
    req.max_new_tokens = static_cast<int64_t>(ref.generated_ids.size());
    req.ignore_eos = true;  // the reference generates a fixed count
    req.return_logits = true;
    auto res = Generate(**engine, {req});
    ASSERT_TRUE(res.ok()) << res.status().ToString();
    EXPECT_EQ((*res)[0].generated, ref.generated_ids) << "greedy tokens differ";
    rows = (*res)[0].logits;
  }
  ASSERT_EQ(static_cast<int64_t>(rows.size()), ref.rows);
  double worst = 0;
  for (int64_t r = 0; r < ref.rows; ++r) {
    const double err = RelativeL2(rows[r].data(), ref.logits.data() + r * ref.width, ref.width);
    worst = std::max(worst, err);
    EXPECT_LE(err, kTolerance) << "row " << r;
  }
  std::cout << "[ reference ] " << dir.filename().string() << " tp=" << tp << ": " << ref.rows
            << " rows, worst relative L2 " << worst << "\n";
}

TEST(ReferenceTest, MatchesTransformersAtEveryTp) {
  const auto dirs = ReferenceCaseDirs();
  ASSERT_FALSE(dirs.empty()) << "no reference cases found under tests/data/references";
  for (const auto& dir : dirs) {
    auto ck = Checkpoint::Open(dir);
    ASSERT_TRUE(ck.ok()) << ck.status().ToString();
    int tested = 0;
    for (int tp : {1, 2, 4, 8}) {
      if (!ShardPlan::Make((*ck)->config(), tp, 0).ok()) continue;
      CheckCase(dir, tp);
      ++tested;
    }
    EXPECT_GE(tested, 1);
  }
}

}  // namespace
}  // namespace gemma2
