// SampleRow, the specification of every backend's sampler.
#include "model/sampling.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "common/sampling_noise.h"
#include "model/shard_pick.h"

namespace gemma2 {
namespace {

RowSampling Sampled(float temperature, int64_t top_k, float top_p, uint64_t seed,
                    uint64_t counter) {
  RowSampling s;
  s.params.greedy = false;
  s.params.temperature = temperature;
  s.params.top_k = top_k;
  s.params.top_p = top_p;
  s.params.seed = seed;
  s.counter = counter;
  return s;
}

TEST(SamplingTest, GreedyTakesTheFirstMaximum) {
  std::vector<float> l = {1, 5, 3, 5};
  EXPECT_EQ(SampleRow(l, {}), 1);
}

TEST(SamplingTest, TopKAndTopPRestrictTheDraw) {
  std::vector<float> l = {0.0f, 2.0f, 1.0f, -1.0f};  // softmax: 0.087, 0.644, 0.237, 0.032
  for (uint64_t c = 0; c < 200; ++c) {
    EXPECT_EQ(SampleRow(l, Sampled(1.0f, 1, 1.0f, 3, c)), 1);
    EXPECT_EQ(SampleRow(l, Sampled(1.0f, 0, 0.5f, 3, c)), 1);  // 0.644 alone reaches 0.5
  }
  std::vector<int> seen(4);
  for (uint64_t c = 0; c < 4000; ++c) ++seen[SampleRow(l, Sampled(1.0f, 0, 0.9f, 3, c))];
  EXPECT_EQ(seen[3], 0);  // 0.644 + 0.237 < 0.9: token 0 is needed, token 3 is not
  EXPECT_GT(seen[0], 0);
  std::vector<int> two(4);
  for (uint64_t c = 0; c < 4000; ++c) ++two[SampleRow(l, Sampled(1.0f, 2, 1.0f, 3, c))];
  EXPECT_EQ(two[0] + two[3], 0);  // top-2: tokens 1 and 2
  EXPECT_GT(two[2], 0);
}

TEST(SamplingTest, TiesAtTheThresholdAreAllKept) {
  std::vector<float> l = {3.0f, 1.0f, 3.0f, 0.0f};
  std::vector<int> seen(4);
  for (uint64_t c = 0; c < 2000; ++c) ++seen[SampleRow(l, Sampled(1.0f, 1, 1.0f, 9, c))];
  EXPECT_GT(seen[0], 0);
  EXPECT_GT(seen[2], 0);
  EXPECT_EQ(seen[1] + seen[3], 0);
}

TEST(SamplingTest, FrequenciesFollowTheSoftmaxAtTemperature) {
  std::vector<float> l = {1.0f, 2.0f, 3.0f};
  std::vector<int> seen(3);
  const int n = 30000;
  for (int c = 0; c < n; ++c) ++seen[SampleRow(l, Sampled(2.0f, 0, 1.0f, 42, c))];
  double z = 0;
  for (float v : l) z += std::exp(v / 2.0);
  for (int i = 0; i < 3; ++i) {
    const double expect = std::exp(l[i] / 2.0) / z;
    EXPECT_NEAR(seen[i] / static_cast<double>(n), expect, 0.015) << i;  // ~5 sigma
  }
}

TEST(SamplingTest, SameSeedAndCounterSameDraw) {
  std::vector<float> l(1000);
  for (int i = 0; i < 1000; ++i) l[i] = std::sin(static_cast<float>(i));
  int differ = 0;
  for (uint64_t c = 0; c < 50; ++c) {
    EXPECT_EQ(SampleRow(l, Sampled(1.0f, 0, 1.0f, 7, c)),
              SampleRow(l, Sampled(1.0f, 0, 1.0f, 7, c)));
    differ +=
        SampleRow(l, Sampled(1.0f, 0, 1.0f, 7, c)) != SampleRow(l, Sampled(1.0f, 0, 1.0f, 8, c));
  }
  EXPECT_GT(differ, 25);  // another seed, other draws
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
  p.top_k = 5;
  EXPECT_TRUE(p.Validate().ok());
}

}  // namespace
}  // namespace gemma2

namespace gemma2 {
namespace {

// The key map and the search the device sampler runs (common/sampling_noise.h), checked here
// where they can be stepped through: the map is monotone and invertible, and the search ends
// on every boundary, the extreme keys included (a 32-bit search of the full range never ends).
TEST(SamplingKeysTest, KeyMapIsMonotoneAndInvertible) {
  const std::vector<float> values = {-INFINITY, -3e38f, -1.0f, -1e-30f, -0.0f,   0.0f,
                                     1e-30f,    0.5f,   1.0f,  3e38f,   INFINITY};
  for (size_t i = 0; i + 1 < values.size(); ++i) {
    EXPECT_LE(FloatKey(values[i]), FloatKey(values[i + 1])) << i;
    EXPECT_EQ(KeyFloat(FloatKey(values[i])), values[i]) << i;
  }
}

TEST(SamplingKeysTest, LargestKeyFindsEveryBoundary) {
  for (uint64_t boundary : {uint64_t{0}, uint64_t{1}, uint64_t{0x7fffffff}, uint64_t{0x80000000},
                            uint64_t{0xfffffffe}, uint64_t{0xffffffff}}) {
    int probes = 0;
    const uint32_t k = LargestKey([&](uint32_t key) {
      ++probes;
      return key <= boundary;
    });
    EXPECT_EQ(k, boundary);
    EXPECT_LE(probes, 33);
  }
  // As the sampler uses it: the threshold of the 2 largest of a few values.
  const std::vector<float> v = {0.5f, -2.0f, 3.0f, 3.0f, 1.0f};
  const uint32_t k2 = LargestKey([&](uint32_t key) {
    int n = 0;
    for (float x : v) n += FloatKey(x) >= key;
    return n >= 3;
  });
  EXPECT_EQ(KeyFloat(k2), 1.0f);
}

}  // namespace
}  // namespace gemma2

namespace gemma2 {
namespace {

// Runs the vocabulary-parallel pick over `tp` uneven shards of `row` (as RankModel splits it),
// summing the ranks' slots as the all-reduce does. Returns -1 when it falls back.
int32_t ShardedPick(const std::vector<float>& row, int tp, const RowSampling& s) {
  const int64_t vocab = static_cast<int64_t>(row.size());
  const std::vector<RowSampling> rows = {s};
  const int64_t width = ShardPickSlotWidth(rows);
  std::vector<float> sum(static_cast<size_t>(tp * width), 0.0f);
  for (int rank = 0; rank < tp; ++rank) {
    const int64_t begin = vocab * rank / tp, end = vocab * (rank + 1) / tp;
    std::vector<float> slots(static_cast<size_t>(tp * width), 0.0f);
    FillShardPick({row.data() + begin, static_cast<size_t>(end - begin)}, 1, end - begin, begin,
                  rows, rank, tp, width, slots);
    for (size_t i = 0; i < sum.size(); ++i) sum[i] += slots[i];
  }
  int32_t id = -1;
  return DecideShardPick(sum, 1, tp, width, vocab, rows, &id) ? id : -1;
}

// Every decided pick is SampleRow's pick on the whole row; LM-like (peaked) rows are decided from
// the shards' candidates, flat rows with a wide top-k fall back.
TEST(ShardPickTest, EqualsSampleRowOnTheAssembledRow) {
  std::mt19937 rng(7);
  int decided = 0, total = 0;
  for (int trial = 0; trial < 400; ++trial) {
    const int64_t vocab = 1000 + trial % 37;
    std::vector<float> row(static_cast<size_t>(vocab));
    std::normal_distribution<float> noise(0.0f, trial % 4 == 0 ? 0.3f : 3.0f);
    for (float& x : row) x = noise(rng);
    if (trial % 5 == 0)
      row[static_cast<size_t>(trial % vocab)] =
          row[static_cast<size_t>((trial + 1) % vocab)];  // a tie
    RowSampling s;
    s.params.greedy = trial % 11 == 0;
    s.params.temperature = trial % 3 == 0 ? 0.7f : 1.3f;
    s.params.top_k = std::vector<int64_t>{0, 1, 5, 40, 300}[static_cast<size_t>(trial % 5)];
    s.params.top_p = std::vector<float>{1.0f, 0.5f, 0.9f, 0.99f}[static_cast<size_t>(trial % 4)];
    s.params.seed = static_cast<uint64_t>(trial);
    s.counter = static_cast<uint64_t>(trial * 3);
    const int32_t want = SampleRow(row, s);
    for (int tp : {2, 3, 8}) {
      const int32_t got = ShardedPick(row, tp, s);
      ++total;
      if (got < 0) continue;
      ++decided;
      EXPECT_EQ(got, want) << "trial " << trial << " tp " << tp;
    }
  }
  std::printf("shard pick decided %d of %d draws\n", decided, total);
  EXPECT_GT(decided, total / 2);  // most rows never assemble
  // A flat row with top_k far past the candidates must fall back, never guess.
  std::vector<float> flat(4096, 0.0f);
  RowSampling wide;
  wide.params.greedy = false;
  wide.params.top_k = 1000;
  EXPECT_EQ(ShardedPick(flat, 4, wide), -1);
}

}  // namespace
}  // namespace gemma2
