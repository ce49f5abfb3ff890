#include "model/checkpoint.h"

#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

#include "model/random_checkpoint.h"
#include "model/sharding.h"
#include "tests/test_files.h"

namespace gemma2 {
namespace {

ModelConfig Tiny(Architecture arch = Architecture::kCausalLM) {
  ModelConfig c;
  c.architecture = arch;
  c.vocab_size = 40;
  c.hidden_size = 8;
  c.intermediate_size = 12;
  c.num_layers = 2;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 4;
  c.query_pre_attn_scalar = 4;
  c.sliding_window = 3;
  c.layer_is_sliding = {true, false};
  if (arch != Architecture::kCausalLM) {
    c.num_labels = 3;
    c.id2label = {"a", "b", "c"};
  }
  return c;
}

TEST(CheckpointTest, SlicesEqualTheFullTensorInEveryDType) {
  for (DType dt : {DType::kBF16, DType::kF16, DType::kF32}) {
    testing::TempDir dir;
    RandomCheckpointOptions o;
    o.dtype = dt;
    o.seed = 3;
    ASSERT_TRUE(WriteRandomCheckpoint(Tiny(), dir.path(), o).ok());
    auto ck = Checkpoint::Open(dir.path());
    ASSERT_TRUE(ck.ok()) << ck.status().ToString();
    const std::string name = "layers.1.mlp.down_proj.weight";  // [8, 12]
    std::vector<float> full(size_t{8} * 12), rows(size_t{3} * 12), cols(size_t{8} * 5);
    ASSERT_TRUE((*ck)->ReadRegion(name, {0, 8, 0, 12}, DType::kF32, full.data()).ok());
    ASSERT_TRUE((*ck)->ReadRegion(name, {2, 5, 0, 12}, DType::kF32, rows.data()).ok());
    ASSERT_TRUE((*ck)->ReadRegion(name, {0, 8, 4, 9}, DType::kF32, cols.data()).ok());
    for (int r = 0; r < 3; ++r) {
      for (int c = 0; c < 12; ++c) EXPECT_EQ(rows[r * 12 + c], full[(r + 2) * 12 + c]);
    }
    for (int r = 0; r < 8; ++r) {
      for (int c = 0; c < 5; ++c) EXPECT_EQ(cols[r * 5 + c], full[r * 12 + c + 4]);
    }
    std::vector<uint16_t> bf(size_t{8} * 12);
    ASSERT_TRUE((*ck)->ReadRegion(name, {0, 8, 0, 12}, DType::kBF16, bf.data()).ok());
    if (dt == DType::kBF16) {
      for (int i = 0; i < 96; ++i) EXPECT_EQ(Bf16ToF32(bf[i]), full[i]);
    }
    EXPECT_FALSE((*ck)->ReadRegion(name, {0, 9, 0, 12}, DType::kF32, full.data()).ok());
  }
}

// Published FP8 layouts (transformers' block scales; compressed-tensors channel and tensor
// scales) read as E4M3 value * scale: within E4M3's rounding (2^-4 relative, plus the subnormal
// step) of the fp32 weights the same seed draws, and every slice equal to the full read's,
// across block boundaries (5 x 3 blocks of a [8, 12] weight in blocks of 2 x 5).
TEST(CheckpointTest, Fp8CheckpointsReadAsTheirDequantizedValues) {
  testing::TempDir plain_dir;
  RandomCheckpointOptions po;
  po.dtype = DType::kF32;
  po.seed = 3;
  ASSERT_TRUE(WriteRandomCheckpoint(Tiny(), plain_dir.path(), po).ok());
  auto plain = Checkpoint::Open(plain_dir.path());
  ASSERT_TRUE(plain.ok());
  const std::string name = "layers.1.mlp.down_proj.weight";  // [8, 12]
  std::vector<float> want(size_t{8} * 12);
  ASSERT_TRUE((*plain)->ReadRegion(name, {0, 8, 0, 12}, DType::kF32, want.data()).ok());
  for (auto kind : {Fp8Scheme::Kind::kBlock, Fp8Scheme::Kind::kChannel, Fp8Scheme::Kind::kTensor}) {
    SCOPED_TRACE(static_cast<int>(kind));
    testing::TempDir dir;
    RandomCheckpointOptions o = po;
    o.fp8.kind = kind;
    o.fp8.block_rows = 2;
    o.fp8.block_cols = 5;
    ASSERT_TRUE(WriteRandomCheckpoint(Tiny(), dir.path(), o).ok());
    auto ck = Checkpoint::Open(dir.path());
    ASSERT_TRUE(ck.ok()) << ck.status().ToString();
    EXPECT_EQ((*ck)->fp8_scheme().kind, kind);
    ASSERT_TRUE((*ck)->CheckShape(name, {8, 12}).ok());
    std::vector<float> full(want.size()), part(size_t{3} * 4);
    ASSERT_TRUE((*ck)->ReadRegion(name, {0, 8, 0, 12}, DType::kF32, full.data()).ok());
    ASSERT_TRUE((*ck)->ReadRegion(name, {3, 6, 4, 8}, DType::kF32, part.data()).ok());
    float amax = 0;
    for (float v : want) amax = std::max(amax, std::fabs(v));
    int inexact = 0;
    for (size_t i = 0; i < want.size(); ++i) {
      EXPECT_NEAR(full[i], want[i], std::fabs(want[i]) / 16 + amax / 448 / 256) << i;
      inexact += full[i] != want[i];
    }
    EXPECT_GT(inexact, 0) << "the weights were not quantized";
    for (int r = 0; r < 3; ++r) {
      for (int c = 0; c < 4; ++c) EXPECT_EQ(part[r * 4 + c], full[(r + 3) * 12 + c + 4]);
    }
  }
  // A scheme the loader does not read is refused naming the field; FP8 tensors without a
  // quantization_config are an error naming the tensor.
  testing::TempDir dir;
  RandomCheckpointOptions o = po;
  o.fp8.kind = Fp8Scheme::Kind::kChannel;
  ASSERT_TRUE(WriteRandomCheckpoint(Tiny(), dir.path(), o).ok());
  auto ck = Checkpoint::Open(dir.path());
  ASSERT_TRUE(ck.ok());
  {
    std::ifstream in(dir.path() / "config.json");
    nlohmann::json j;
    in >> j;
    j["quantization_config"]["config_groups"]["group_0"]["weights"]["strategy"] = "group";
    std::ofstream(dir.path() / "config.json") << j.dump();
    auto bad = Checkpoint::Open(dir.path());
    ASSERT_FALSE(bad.ok());
    EXPECT_NE(bad.status().message().find("strategy"), std::string::npos) << bad.status().message();
    for (const char* hostile : {R"({"quant_method": 5})",
                                R"({"quant_method": "fp8", "weight_block_size": [4611686018427387904, 1]})",
                                R"({"quant_method": "compressed-tensors", "format": "float-quantized",
                                    "config_groups": {"g": {"weights": {"num_bits": "8"}}}})",
                                R"("fp8")"}) {
      j["quantization_config"] = nlohmann::json::parse(hostile);
      std::ofstream(dir.path() / "config.json") << j.dump();
      auto refused = Checkpoint::Open(dir.path());  // an error, never an exception or overflow
      EXPECT_FALSE(refused.ok()) << hostile;
      EXPECT_NE(refused.status().message().find("quantization_config"), std::string::npos)
          << refused.status().message();
    }
    j.erase("quantization_config");
    std::ofstream(dir.path() / "config.json") << j.dump();
    auto none = Checkpoint::Open(dir.path());
    ASSERT_TRUE(none.ok());
    const Status st = (*none)->CheckShape(name, {8, 12});
    EXPECT_NE(st.message().find("quantization_config"), std::string::npos) << st.message();
    EXPECT_NE(st.message().find(name), std::string::npos) << st.message();
  }
}

TEST(CheckpointTest, ShardedCheckpointsAndClassifierHeads) {
  testing::TempDir dir;
  RandomCheckpointOptions o;
  o.shards = 3;
  ASSERT_TRUE(WriteRandomCheckpoint(Tiny(Architecture::kTokenClassification), dir.path(), o).ok());
  EXPECT_TRUE(std::filesystem::exists(dir.path() / "model.safetensors.index.json"));
  auto ck = Checkpoint::Open(dir.path());
  ASSERT_TRUE(ck.ok()) << ck.status().ToString();
  EXPECT_TRUE((*ck)->Has("score.weight"));
  EXPECT_TRUE((*ck)->Has("score.bias"));
  EXPECT_TRUE((*ck)->Has("layers.0.self_attn.q_proj.weight"));
  EXPECT_TRUE((*ck)->CheckShape("score.bias", {3}).ok());
}

TEST(CheckpointTest, ErrorsNameTheFileAndTensor) {
  testing::TempDir dir;
  ASSERT_TRUE(WriteRandomCheckpoint(Tiny(), dir.path(), {}).ok());
  auto ck = Checkpoint::Open(dir.path());
  ASSERT_TRUE(ck.ok());
  auto shape = (*ck)->CheckShape("layers.0.self_attn.q_proj.weight", {17, 8});
  EXPECT_NE(shape.message().find("has shape [16, 8], expected [17, 8]"), std::string::npos)
      << shape.message();
  EXPECT_NE(shape.message().find("model.safetensors"), std::string::npos);
  auto missing = (*ck)->CheckShape("layers.9.mlp.up_proj.weight", {12, 8});
  EXPECT_NE(missing.message().find("'layers.9.mlp.up_proj.weight' is missing"), std::string::npos);

  // A truncated weights file.
  const auto file = dir.path() / "model.safetensors";
  std::filesystem::resize_file(file, std::filesystem::file_size(file) - 10);
  auto trunc = Checkpoint::Open(dir.path());
  ASSERT_FALSE(trunc.ok());
  EXPECT_NE(trunc.status().message().find("model.safetensors"), std::string::npos);
  EXPECT_NE(trunc.status().message().find("lies outside"), std::string::npos)
      << trunc.status().message();
}

TEST(CheckpointTest, AFileCutShortAfterOpeningIsAnErrorNotACrash) {
  testing::TempDir dir;
  ASSERT_TRUE(WriteRandomCheckpoint(Tiny(), dir.path(), {}).ok());
  auto ck = Checkpoint::Open(dir.path());
  ASSERT_TRUE(ck.ok());
  // Another process truncates the weights while this one loads them (through a map, reading
  // the lost pages would raise SIGBUS).
  const auto file = dir.path() / "model.safetensors";
  std::filesystem::resize_file(file, 64);
  std::vector<float> out(size_t{8} * 12);
  for (const Region& r : {Region{0, 8, 0, 12}, Region{0, 8, 4, 9}}) {
    const Status st =
        (*ck)->ReadRegion("layers.1.mlp.down_proj.weight", r, DType::kF32, out.data());
    EXPECT_EQ(st.code(), StatusCode::kDataLoss) << st.ToString();
    EXPECT_NE(st.message().find("model.safetensors: the file ends before byte"), std::string::npos)
        << st.message();
  }
}

TEST(CheckpointTest, RejectsBadIndexAndMissingFiles) {
  testing::TempDir dir;
  RandomCheckpointOptions o;
  o.shards = 2;
  ASSERT_TRUE(WriteRandomCheckpoint(Tiny(), dir.path(), o).ok());
  const auto index = dir.path() / "model.safetensors.index.json";
  testing::WriteFile(index, R"({"weight_map": {"model.norm.weight": "../../etc/passwd"}})");
  auto bad = Checkpoint::Open(dir.path());
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("invalid shard file"), std::string::npos);
  testing::WriteFile(
      index, R"({"weight_map": {"model.norm.weight": "model-00009-of-00009.safetensors"}})");
  EXPECT_EQ(Checkpoint::Open(dir.path()).status().code(), StatusCode::kNotFound);
  testing::WriteFile(index, "[");
  EXPECT_FALSE(Checkpoint::Open(dir.path()).ok());
  EXPECT_FALSE(Checkpoint::Open(dir.path() / "absent").ok());
}

TEST(CheckpointTest, StackedRowsReadInAnyChunksEqualTheWholeRead) {
  testing::TempDir dir;
  ASSERT_TRUE(WriteRandomCheckpoint(Tiny(), dir.path(), {}).ok());
  auto ck = Checkpoint::Open(dir.path());
  ASSERT_TRUE(ck.ok());
  // q rows 4..12 | k rows 2..6 | v rows 0..8, columns 2..7: 20 rows of 5, as a tensor-parallel
  // rank stacks them (a column slice too, to cover the strided path).
  const std::vector<WeightPart> parts = {
      {"layers.0.self_attn.q_proj.weight", {16, 8}, {4, 12, 2, 7}},
      {"layers.0.self_attn.k_proj.weight", {8, 8}, {2, 6, 2, 7}},
      {"layers.0.self_attn.v_proj.weight", {8, 8}, {0, 8, 2, 7}}};
  std::vector<float> whole(20 * 5, -1.0f);
  ASSERT_TRUE(ReadStackedRows(**ck, parts, DType::kF32, 0, 20, whole.data()).ok());
  std::vector<float> part(8 * 5);
  ASSERT_TRUE((*ck)->ReadRegion(parts[1].name, parts[1].region, DType::kF32, part.data()).ok());
  for (int i = 0; i < 4 * 5; ++i) ASSERT_EQ(whole[8 * 5 + i], part[i]);  // k follows q's 8 rows
  for (int64_t chunk : {1, 3, 7, 19}) {
    std::vector<float> pieces(20 * 5, -2.0f);
    for (int64_t r0 = 0; r0 < 20; r0 += chunk) {
      const int64_t r1 = std::min<int64_t>(20, r0 + chunk);
      ASSERT_TRUE(ReadStackedRows(**ck, parts, DType::kF32, r0, r1, pieces.data() + r0 * 5).ok());
    }
    EXPECT_EQ(pieces, whole) << "chunks of " << chunk;
  }
  const std::vector<WeightPart> absent = {{"layers.0.nope", {8, 8}, {0, 8, 0, 8}}};
  EXPECT_FALSE(ReadStackedRows(**ck, absent, DType::kF32, 0, 8, part.data()).ok());
}

TEST(CheckpointTest, WillReadPullsTheRegionsRowsAndIgnoresUnknownNames) {
  testing::TempDir dir;
  ASSERT_TRUE(WriteRandomCheckpoint(Tiny(), dir.path(), {}).ok());  // bf16
  auto ck = Checkpoint::Open(dir.path());
  ASSERT_TRUE(ck.ok());
  (*ck)->WillRead("layers.1.mlp.down_proj.weight", {2, 5, 4, 9});  // 3 whole rows of 12 bf16
  (*ck)->WillRead("layers.7.absent", {0, 1, 0, 1});
  (*ck)->WillRead("norm.weight", {0, 1, 0, 8});  // 1-D: one row of 8
  (*ck)->WillRead("norm.weight", {0, 9, 0, 8});  // rows past the end are not read
  (*ck)->read_ahead().WaitIdle();
  EXPECT_EQ((*ck)->read_ahead().bytes_read(), 3 * 12 * 2 + 8 * 2 + 8 * 2);
}

TEST(ReadAheadTest, ReadsEveryQueuedRangeAndSkipsWhatItCannotRead) {
  testing::TempDir dir;
  const auto file = dir.path() / "data";
  testing::WriteFile(file, std::string(100000, 'x'));
  ReadAhead ra(/*threads=*/3, /*chunk_bytes=*/4096);
  ra.Add(file.string(), 1000, 50000);
  ra.Add((dir.path() / "absent").string(), 0, 100);
  ra.Add(file.string(), 90000, 20000);  // 10000 bytes lie past the end
  ra.Add(file.string(), 5, 0);
  ra.WaitIdle();
  EXPECT_EQ(ra.bytes_read(), 50000 + 10000);
  ra.Add(file.string(), 0, 100000);  // after idle, the threads take work again
  ra.WaitIdle();
  EXPECT_EQ(ra.bytes_read(), 160000);
}

TEST(ShardingTest, SplitsReplicatesOrRefuses) {
  ModelConfig c = Tiny();  // 4 q heads, 2 kv heads, intermediate 12
  auto p = ShardPlan::Make(c, 2, 1);
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->q_head_begin, 2);
  EXPECT_EQ(p->kv_head_begin, 1);
  EXPECT_EQ(p->kv_heads(), 1);
  EXPECT_EQ(p->inter_begin, 6);
  EXPECT_EQ(p->vocab_begin, 20);
  auto r = ShardPlan::Make(c, 4, 3);  // kv replicated: rank 3 has q head 3 -> kv head 1
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->q_head_begin, 3);
  EXPECT_EQ(r->kv_head_begin, 1);
  EXPECT_EQ(r->kv_heads(), 1);
  auto bad = ShardPlan::Make(c, 3, 0);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("tp=3"), std::string::npos);
  c.intermediate_size = 10;
  EXPECT_FALSE(ShardPlan::Make(c, 4, 0).ok());
  // 27B: 32 q / 16 kv heads split up to tp 16; tp 32 replicates kv heads.
  auto big = PresetConfig("27b");
  for (int tp : {1, 2, 4, 8, 16, 32}) EXPECT_TRUE(ShardPlan::Make(*big, tp, tp - 1).ok()) << tp;
  EXPECT_FALSE(ShardPlan::Make(*big, 64, 0).ok());
}

}  // namespace
}  // namespace gemma2
