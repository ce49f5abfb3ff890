#include "model/safetensors.h"

#include <gtest/gtest.h>

#include <cmath>

#include "tests/test_files.h"

namespace gemma2 {
namespace {

using testing::RawSafetensors;

Result<SafetensorsHeader> Parse(const std::string& bytes) {
  const auto* p = reinterpret_cast<const uint8_t*>(bytes.data());
  const auto n = static_cast<int64_t>(bytes.size());
  return ParseSafetensorsHeader(p, n, n, "f.safetensors");
}

void ExpectError(const std::string& bytes, const std::string& fragment) {
  auto r = Parse(bytes);
  ASSERT_FALSE(r.ok()) << "accepted: " << fragment;
  EXPECT_NE(r.status().message().find(fragment), std::string::npos) << r.status().message();
  EXPECT_NE(r.status().message().find("f.safetensors"), std::string::npos) << r.status().message();
}

TEST(SafetensorsTest, ParsesAValidHeader) {
  const std::string h =
      R"({"__metadata__":{"format":"pt"},"a":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,12]},)"
      R"("b":{"dtype":"F32","shape":[],"data_offsets":[12,16]}})";
  auto r = Parse(RawSafetensors(h, 16));
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->tensors.size(), 2u);
  EXPECT_EQ(r->tensors.at("a").shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(r->tensors.at("b").num_elements(), 1);
  EXPECT_EQ(r->metadata.at("format"), "pt");
  EXPECT_EQ(r->data_offset, 8 + static_cast<int64_t>(h.size()));
}

TEST(SafetensorsTest, RejectsEveryKindOfDamage) {
  const std::string ok_entry = R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})";
  ExpectError("abc", "truncated");
  ExpectError(RawSafetensors("{}", 0, 1000), "runs past the end");
  ExpectError(RawSafetensors("{}", 0, 1ull << 40), "exceeds the 100 MB limit");
  ExpectError(RawSafetensors("{" + ok_entry + "}", 4), "outside the 4-byte data section");
  ExpectError(RawSafetensors(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8),
              "shape x dtype size is 12 bytes but data_offsets span 8");
  ExpectError(RawSafetensors(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                             R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                             12),
              "overlap");
  ExpectError(RawSafetensors(R"({"a":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}})", 8),
              "unknown dtype 'Q4'");
  ExpectError(RawSafetensors("{not json", 0), "not valid UTF-8 JSON");
  ExpectError(RawSafetensors("{\"a\xff\xfe\":1}", 0), "not valid UTF-8 JSON");
  ExpectError(RawSafetensors("[1,2,3]", 0), "not a JSON object");
  ExpectError(RawSafetensors(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8),
              "negative");
  ExpectError(RawSafetensors(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", 8),
              "begin > end");
  ExpectError(RawSafetensors(R"({"a":{"dtype":"F32","shape":[2]}})", 8),
              "needs dtype, shape and data_offsets");
  ExpectError(RawSafetensors(std::string(100, '[') + std::string(100, ']'), 0),
              "nested too deeply");
  ExpectError(
      RawSafetensors(
          R"({"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}})", 8),
      "overflows");
}

TEST(SafetensorsTest, WriterOutputReadsBack) {
  testing::TempDir dir;
  std::vector<TensorToWrite> ts = {{"x", DType::kBF16, {2, 2}, std::vector<uint8_t>(8, 7)},
                                   {"y", DType::kF32, {3}, std::vector<uint8_t>(12, 9)}};
  ASSERT_TRUE(WriteSafetensors(dir.path() / "m.safetensors", ts, {{"k", "v"}}).ok());
  auto f = SafetensorsFile::Open(dir.path() / "m.safetensors");
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  const auto& y = (*f)->header().tensors.at("y");
  EXPECT_EQ((*f)->TensorData(y)[0], 9);
  EXPECT_EQ((*f)->header().data_offset % 8, 0);
  EXPECT_EQ((*f)->header().metadata.at("k"), "v");
}

TEST(SafetensorsTest, OpenNamesTheFile) {
  testing::TempDir dir;
  auto missing = SafetensorsFile::Open(dir.path() / "nope.safetensors");
  EXPECT_FALSE(missing.ok());
  EXPECT_NE(missing.status().message().find("nope.safetensors"), std::string::npos);
  testing::WriteFile(dir.path() / "short.safetensors", std::string("\x10\x00", 2));
  auto trunc = SafetensorsFile::Open(dir.path() / "short.safetensors");
  EXPECT_FALSE(trunc.ok());
  EXPECT_NE(trunc.status().message().find("truncated"), std::string::npos);
  testing::WriteFile(dir.path() / "empty.safetensors", "");
  EXPECT_FALSE(SafetensorsFile::Open(dir.path() / "empty.safetensors").ok());
}

TEST(DTypeTest, ConversionsMatchIeee) {
  EXPECT_EQ(Bf16ToF32(0x3f80), 1.0f);
  EXPECT_EQ(F32ToBf16(1.0f), 0x3f80);
  EXPECT_EQ(Bf16ToF32(F32ToBf16(67.882251f)), 68.0f);  // sqrt(4608) in bf16, as the reference
  EXPECT_EQ(F32ToBf16(1.00390625f), 0x3f80);           // ties to even
  EXPECT_EQ(F16ToF32(0x3c00), 1.0f);
  EXPECT_EQ(F16ToF32(0xc000), -2.0f);
  EXPECT_EQ(F16ToF32(0x0001), std::ldexp(1.0f, -24));  // smallest subnormal
  EXPECT_TRUE(std::isinf(F16ToF32(0x7c00)));
  EXPECT_EQ(F16ToF32(0x7bff), 65504.0f);
  // Every fp16 value survives fp16 -> fp32 -> fp16; halfway cases round to even.
  for (uint32_t h = 0; h < 0x10000; ++h) {
    if ((h & 0x7c00) == 0x7c00 && (h & 0x3ff)) continue;  // NaN payloads
    EXPECT_EQ(F32ToF16(F16ToF32(static_cast<uint16_t>(h))), h) << h;
  }
  EXPECT_EQ(F32ToF16(1.0f + std::ldexp(1.0f, -11)), 0x3c00);  // tie -> even
  EXPECT_EQ(F32ToF16(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02);
  EXPECT_EQ(F32ToF16(1e6f), 0x7c00);
  EXPECT_EQ(F32ToF16(std::ldexp(1.0f, -26)), 0);
  EXPECT_EQ(F32ToF16(std::ldexp(3.0f, -26)), 0x0001);
}

// FP8 E4M3 (fn): every code but NaN survives decode -> encode; ties go to even; beyond 448
// saturates (CUDA's SATFINITE); subnormals step by 2^-9.
TEST(DTypeTest, Fp8E4M3RoundTripsTiesToEvenAndSaturates) {
  EXPECT_EQ(DTypeFromSafetensorsName("F8_E4M3"), DType::kF8E4M3);
  EXPECT_EQ(F8E4M3ToF32(0x38), 1.0f);
  EXPECT_EQ(F8E4M3ToF32(0x7e), 448.0f);
  EXPECT_EQ(F8E4M3ToF32(0x01), std::ldexp(1.0f, -9));
  EXPECT_EQ(F8E4M3ToF32(0x08), std::ldexp(1.0f, -6));
  EXPECT_TRUE(std::isnan(F8E4M3ToF32(0x7f)));
  for (int v = 0; v < 256; ++v) {
    if ((v & 0x7f) == 0x7f) continue;
    EXPECT_EQ(F32ToF8E4M3(F8E4M3ToF32(static_cast<uint8_t>(v))), v) << v;
  }
  EXPECT_EQ(F32ToF8E4M3(1.0625f), 0x38);  // halfway between 1 and 1.125: to even (1)
  EXPECT_EQ(F32ToF8E4M3(1.1875f), 0x3a);  // halfway between 1.125 and 1.25: to even (1.25)
  EXPECT_EQ(F32ToF8E4M3(1.07f), 0x39);
  EXPECT_EQ(F32ToF8E4M3(500.0f), 0x7e);
  EXPECT_EQ(F32ToF8E4M3(-INFINITY), 0xfe);
  EXPECT_EQ(F32ToF8E4M3(std::ldexp(1.0f, -10)), 0x00);  // tie between 0 and 2^-9: even (0)
  EXPECT_EQ(F32ToF8E4M3(std::ldexp(3.0f, -10)), 0x02);  // tie between 1 and 2 steps: even (2)
  EXPECT_EQ(F32ToF8E4M3(-0.0f), 0x80);
  EXPECT_EQ(F32ToF8E4M3(0.0155f), 0x08);  // rounds up into the smallest normal
}

}  // namespace
}  // namespace gemma2
