#include "model/sampling.h"

#include <gtest/gtest.h>

#include <cmath>
#include <vector>

namespace gemma2 {
namespace {

TEST(SamplingTest, GreedyTakesTheFirstMaximum) {
  std::mt19937_64 rng(0);
  std::vector<float> l = {1, 5, 3, 5};
  EXPECT_EQ(SampleToken(l, {}, rng), 1);
}

TEST(SamplingTest, TopKAndTopPRestrictTheDraw) {
  std::vector<float> l = {0.0f, 2.0f, 1.0f, -1.0f};
  SamplingParams p;
  p.greedy = false;
  p.top_k = 1;
  std::mt19937_64 rng(1);
  for (int i = 0; i < 50; ++i) EXPECT_EQ(SampleToken(l, p, rng), 1);
  p.top_k = 0;
  p.top_p = 0.5f;  // token 1 alone has p ~ 0.64
  for (int i = 0; i < 50; ++i) EXPECT_EQ(SampleToken(l, p, rng), 1);
  p.top_p = 0.9f;  // tokens 1 and 2 (0.64 + 0.24 = 0.88 < 0.9) and 0 (0.97)
  std::vector<int> seen(4);
  for (int i = 0; i < 2000; ++i) ++seen[SampleToken(l, p, rng)];
  EXPECT_EQ(seen[3], 0);
  EXPECT_GT(seen[0], 0);
}

TEST(SamplingTest, FrequenciesFollowTheSoftmaxAtTemperature) {
  std::vector<float> l = {1.0f, 2.0f, 3.0f};
  SamplingParams p;
  p.greedy = false;
  p.temperature = 2.0f;
  std::mt19937_64 rng(42);
  std::vector<int> seen(3);
  const int n = 30000;
  for (int i = 0; i < n; ++i) ++seen[SampleToken(l, p, rng)];
  double z = 0;
  for (float v : l) z += std::exp(v / 2.0);
  for (int i = 0; i < 3; ++i) {
    const double expect = std::exp(l[i] / 2.0) / z;
    EXPECT_NEAR(seen[i] / static_cast<double>(n), expect, 0.015) << i;  // ~5 sigma
  }
}

TEST(SamplingTest, SameSeedSameDraws) {
  std::vector<float> l(100);
  for (int i = 0; i < 100; ++i) l[i] = std::sin(static_cast<float>(i));
  SamplingParams p;
  p.greedy = false;
  std::mt19937_64 a(7), b(7);
  for (int i = 0; i < 20; ++i) EXPECT_EQ(SampleToken(l, p, a), SampleToken(l, p, b));
}

TEST(SamplingTest, ValidatesParameters) {
  SamplingParams p;
  p.greedy = false;
  p.temperature = 0;
  EXPECT_FALSE(p.Validate().ok());
  p.temperature = NAN;
  EXPECT_FALSE(p.Validate().ok());
  p.temperature = 1;
  p.top_p = 0;
  EXPECT_FALSE(p.Validate().ok());
  p.top_p = 1.5f;
  EXPECT_FALSE(p.Validate().ok());
  p.top_p = 1;
  p.top_k = -1;
  EXPECT_FALSE(p.Validate().ok());
}

}  // namespace
}  // namespace gemma2
