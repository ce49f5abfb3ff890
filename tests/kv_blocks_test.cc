// The block tables the coordinator owns and every rank mirrors (model/kv_blocks.h).
#include "model/kv_blocks.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <set>

#include "model/step.h"

namespace gemma2 {
namespace {

KvLayout Layout(int64_t window) {
  KvLayout l;
  l.block_size = 4;
  l.window = window;
  l.max_blocks = 64;
  l.present = {true, window > 0};
  return l;
}

int64_t Held(const KvBlockTables& t, int64_t id, KvGroup g) {
  const auto s = t.table(id, g);
  return std::count_if(s.begin(), s.end(), [](int32_t b) { return b >= 0; });
}

StepPlan StepOf(int64_t id, int64_t start, int64_t n) {
  StepPlan p;
  StepSequence s;
  s.sequence_id = id;
  s.start_pos = start;
  s.tokens.assign(static_cast<size_t>(n), 0);
  p.sequences.push_back(s);
  return p;
}

// Full-attention layers keep every block; sliding-window layers give back the blocks below the
// window of the next query, and the next sequence reuses them. A rank applying the owner's
// assignments ends with the same tables.
TEST(KvBlockTablesTest, SlidingBlocksAreGivenBackAndReused) {
  KvBlockTables owner(Layout(6), 40), rank(Layout(6), 40);
  std::map<int64_t, int64_t> len = {{1, 0}};
  std::set<int32_t> ever;  // every block sequence 1 held
  size_t takes = 0;
  for (int64_t n : {10, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 5}) {  // prefill, decode, a chunk
    StepPlan p = StepOf(1, len[1], n);
    ASSERT_TRUE(owner.Plan(p, &p.kv_assign).ok());
    for (const KvAssign& a : p.kv_assign) {
      if (a.physical < 0) continue;
      ever.insert(a.physical);
      ++takes;
    }
    ASSERT_TRUE(rank.Apply(p.kv_assign).ok());
    len[1] += n;
    for (int g = 0; g < kKvGroups; ++g) {
      const auto a = owner.table(1, static_cast<KvGroup>(g)),
                 b = rank.table(1, static_cast<KvGroup>(g));
      EXPECT_TRUE(std::equal(a.begin(), a.end(), b.begin(), b.end()));
    }
  }
  // 25 positions: 7 full blocks; the last step's queries (20..24) reach back to 15: blocks 3..6.
  EXPECT_EQ(Held(owner, 1, KvGroup::kFull), 7);
  EXPECT_EQ(Held(owner, 1, KvGroup::kSliding), 4);
  EXPECT_EQ(owner.free_blocks(), 40 - 11);
  EXPECT_EQ(owner.free_blocks(), rank.free_blocks());
  EXPECT_LE(11, owner.layout().BudgetFor(25, 5));
  EXPECT_LT(ever.size(), takes);  // blocks given back were taken again
  // The given-back blocks serve the next sequence.
  StepPlan p = StepOf(2, 0, 8);
  std::set<int32_t> held;
  for (int g = 0; g < kKvGroups; ++g) {
    for (int32_t b : owner.table(1, static_cast<KvGroup>(g))) held.insert(b);
  }
  ASSERT_TRUE(owner.Plan(p, &p.kv_assign).ok());
  for (const KvAssign& a : p.kv_assign) EXPECT_EQ(held.count(a.physical), 0u) << a.physical;
  ASSERT_TRUE(rank.Apply(p.kv_assign).ok());
  owner.Release(1);
  rank.Release(1);
  EXPECT_EQ(owner.free_blocks(), 40 - 4);
  EXPECT_EQ(rank.free_blocks(), 40 - 4);
}

// Gemma 2 27B's layout (23 sliding-window layers with a window of 4096, 23 full ones; blocks of
// 16): a sequence prefilled in chunks of 256 and decoded to 8192 positions holds every block of
// its full layers and only the window's of the others: 512 + 257 blocks, 75% of a plain cache's
// 1024 (8192 is Gemma 2's longest context; the share falls toward 50% as contexts outgrow the
// window).
TEST(KvBlockTablesTest, TwentySevenBLayoutAtEightThousandPositions) {
  ModelConfig c;
  c.num_layers = 46;
  c.sliding_window = 4096;
  c.max_position_embeddings = 8192;
  for (int l = 0; l < 46; ++l) c.layer_is_sliding.push_back(l % 2 == 0);
  const KvLayout layout = KvLayout::For(c, 16);
  KvBlockTables t(layout, 2048);
  std::map<int64_t, int64_t> len = {{1, 0}};
  while (len[1] < 8191) {
    StepPlan p = StepOf(1, len[1], len[1] + 256 <= 8000 ? 256 : 1);
    ASSERT_TRUE(t.Plan(p, &p.kv_assign).ok()) << len[1];
    len[1] += static_cast<int64_t>(p.sequences[0].tokens.size());
  }
  EXPECT_EQ(len[1], 8191);
  EXPECT_EQ(Held(t, 1, KvGroup::kFull), 512);
  EXPECT_EQ(Held(t, 1, KvGroup::kSliding), 257);  // a query at 8190 sees 4095..8190
  EXPECT_EQ(t.free_blocks(), 2048 - 769);
}

// Too few blocks: kUnavailable naming the shortfall, and nothing changed.
TEST(KvBlockTablesTest, AFullCacheRefusesThePlanAndKeepsTheTables) {
  KvBlockTables t(Layout(0), 5);
  StepPlan p = StepOf(1, 0, 16);
  ASSERT_TRUE(t.Plan(p, &p.kv_assign).ok());
  StepPlan q = StepOf(2, 0, 8);
  const Status st = t.Plan(q, &q.kv_assign);
  EXPECT_EQ(st.code(), StatusCode::kUnavailable);
  EXPECT_NE(st.message().find("KV cache full: the step needs 2 more blocks"), std::string::npos)
      << st.message();
  EXPECT_TRUE(q.kv_assign.empty());
  EXPECT_EQ(t.free_blocks(), 1);
  EXPECT_TRUE(t.table(2, KvGroup::kFull).empty());
  StepPlan far = StepOf(1, 16, 64 * 4);  // past a sequence's 64 blocks
  EXPECT_EQ(t.Plan(far, &far.kv_assign).code(), StatusCode::kInvalidArgument);
}

// A rank refuses what would corrupt another sequence's cache, naming the assignment.
TEST(KvBlockTablesTest, BadAssignmentsAreRefused) {
  KvBlockTables t(Layout(6), 8);
  ASSERT_TRUE(t.Apply(std::vector<KvAssign>{{1, 0, 0, 3}}).ok());
  Status st = t.Apply(std::vector<KvAssign>{{2, 0, 0, 3}});
  EXPECT_NE(st.message().find("held by sequence 1"), std::string::npos) << st.message();
  st = t.Apply(std::vector<KvAssign>{{1, 0, 0, 4}});
  EXPECT_NE(st.message().find("already holds block 3"), std::string::npos) << st.message();
  EXPECT_FALSE(t.Apply(std::vector<KvAssign>{{1, 0, 1, 8}}).ok());   // no such block
  EXPECT_FALSE(t.Apply(std::vector<KvAssign>{{1, 0, 64, 5}}).ok());  // past the table
  EXPECT_FALSE(t.Apply(std::vector<KvAssign>{{1, 2, 0, 5}}).ok());   // no such group
  EXPECT_FALSE(t.Apply(std::vector<KvAssign>{{1, 1, 0, -1}}).ok());  // gives back nothing
  EXPECT_TRUE(t.Apply(std::vector<KvAssign>{{1, 0, 0, -1}}).ok());
  EXPECT_EQ(t.free_blocks(), 8);
}

// A prefix copy takes the source's blocks of both groups; a prefix whose window the source gave
// back is refused (the scheduler's prefix cache asks CopyFloor first).
TEST(KvBlockTablesTest, PrefixCopiesNeedTheWindowStillHeld) {
  KvBlockTables t(Layout(6), 64);
  StepPlan p = StepOf(1, 0, 20);
  ASSERT_TRUE(t.Plan(p, &p.kv_assign).ok());
  p = StepOf(1, 20, 1);  // its query at 20 sees 15..20: sliding blocks 0..2 given back
  ASSERT_TRUE(t.Plan(p, &p.kv_assign).ok());
  EXPECT_EQ(t.CopyFloor(1), 3 * 4 + 6 - 1);
  StepPlan c;
  c.kv_copies = {{1, 2, 16}};
  EXPECT_NE(t.Plan(c, &c.kv_assign).message().find("only holds prefixes of 17"), std::string::npos);
  c.kv_copies = {{1, 3, 20}};
  ASSERT_TRUE(t.Plan(c, &c.kv_assign).ok());
  std::vector<int32_t> from, to;
  ASSERT_TRUE(t.CopyPairs(1, 3, 20, &from, &to).ok());
  EXPECT_EQ(from.size(), 5u + 2u);  // full 0..4; sliding 3..4 (a query at 20 sees 15..)
  for (size_t i = 0; i < from.size(); ++i) EXPECT_NE(from[i], to[i]);
}

// Random steps, copies and releases over many sequences: a rank mirroring the owner agrees on
// every table, no block is ever held twice (Apply would refuse), and each sequence holds at most
// its budget.
TEST(KvBlockTablesTest, RandomTrafficKeepsOwnerAndRankInStep) {
  const KvLayout layout = Layout(9);
  KvBlockTables owner(layout, 200), rank(layout, 200);
  std::mt19937_64 rng(7);
  std::map<int64_t, int64_t> len;
  int64_t next = 1;
  std::vector<int64_t> released;  // by the owner, told to the rank with the next plan it runs
  for (int round = 0; round < 2000; ++round) {
    StepPlan p;
    const int action = static_cast<int>(rng() % 10);
    if (action == 0 && !len.empty()) {
      const int64_t id = std::next(len.begin(), static_cast<long>(rng() % len.size()))->first;
      owner.Release(id);
      len.erase(id);
      released.push_back(id);
    } else if (len.size() < 6 || action == 1) {
      len[next++] = 0;
    }
    for (auto& [id, n] : len) {
      if (rng() % 2) continue;
      StepSequence s;
      s.sequence_id = id;
      s.start_pos = n;
      const int64_t take = std::min<int64_t>(1 + static_cast<int64_t>(rng() % 7), 250 - n);
      if (take <= 0) continue;
      s.tokens.assign(static_cast<size_t>(take), 0);
      p.sequences.push_back(s);
    }
    if (!owner.Plan(p, &p.kv_assign).ok()) continue;  // full: try other traffic
    for (int64_t id : released) rank.Release(id);
    released.clear();
    const Status applied = rank.Apply(p.kv_assign);
    ASSERT_TRUE(applied.ok()) << round << ": " << applied.ToString();
    for (const StepSequence& s : p.sequences) {
      len[s.sequence_id] += static_cast<int64_t>(s.tokens.size());
      EXPECT_LE(Held(owner, s.sequence_id, KvGroup::kFull) +
                    Held(owner, s.sequence_id, KvGroup::kSliding),
                layout.BudgetFor(len[s.sequence_id], 7));
    }
    EXPECT_EQ(owner.free_blocks(), rank.free_blocks());
  }
  for (const auto& [id, n] : len) {
    for (int g = 0; g < kKvGroups; ++g) {
      const auto a = owner.table(id, static_cast<KvGroup>(g)),
                 b = rank.table(id, static_cast<KvGroup>(g));
      EXPECT_TRUE(std::equal(a.begin(), a.end(), b.begin(), b.end())) << id;
    }
  }
}

}  // namespace
}  // namespace gemma2
