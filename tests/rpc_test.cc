// Control-plane wire format and the cluster-secret handshake.
#include <gtest/gtest.h>

#include <cmath>

#include "rpc/auth.h"
#include "rpc/wire.h"

namespace gemma2::rpc {
namespace {

StepPlan SamplePlan() {
  StepPlan p;
  p.ids_only = true;
  p.released = {3, 5};
  p.kv_copies = {{9, 7, 64}};
  p.kv_assign = {{9, 1, 3, -1}, {7, 0, 0, 12}, {7, 1, 511, 70000}};
  StepSequence a;
  a.sequence_id = 7;
  a.start_pos = 0;
  a.tokens = {2, 100, 200, 255999};
  a.output_rows = {3};
  StepSequence b;
  b.sequence_id = 9;
  b.start_pos = 4096;
  b.tokens = {17};
  b.output_rows = {0};
  b.sampling.params.greedy = false;
  b.sampling.params.temperature = 0.7f;
  b.sampling.params.top_k = 40;
  b.sampling.params.top_p = 0.9f;
  b.sampling.params.seed = 1234567890123ull;
  b.sampling.counter = 12;
  b.token_mask = 1;
  p.token_masks = {TokenMaskWords(4000, ~uint64_t{0}), TokenMaskWords(4000, 0)};
  p.token_masks[1][3999] = uint64_t{1} << 63;
  p.token_masks[1][0] = 5;
  p.sequences = {a, b};
  return p;
}

TEST(WireTest, StepPlanRoundTrips) {
  const StepPlan p = SamplePlan();
  const auto bytes = EncodeStep(p);
  auto back = DecodeStep(bytes);
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  ASSERT_EQ(back->sequences.size(), 2u);
  EXPECT_TRUE(back->ids_only);
  EXPECT_EQ(back->released, (std::vector<int64_t>{3, 5}));
  ASSERT_EQ(back->kv_copies.size(), 1u);
  EXPECT_EQ(back->kv_copies[0].src, 9);
  EXPECT_EQ(back->kv_copies[0].dst, 7);
  EXPECT_EQ(back->kv_copies[0].tokens, 64);
  ASSERT_EQ(back->kv_assign.size(), 3u);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(back->kv_assign[i].sequence_id, p.kv_assign[i].sequence_id);
    EXPECT_EQ(back->kv_assign[i].group, p.kv_assign[i].group);
    EXPECT_EQ(back->kv_assign[i].logical, p.kv_assign[i].logical);
    EXPECT_EQ(back->kv_assign[i].physical, p.kv_assign[i].physical);
  }
  EXPECT_EQ(back->sequences[0].tokens, p.sequences[0].tokens);
  EXPECT_EQ(back->sequences[1].start_pos, 4096);
  EXPECT_EQ(back->sequences[1].sampling.params.top_k, 40);
  EXPECT_EQ(back->sequences[1].sampling.params.seed, 1234567890123ull);
  EXPECT_EQ(back->sequences[1].sampling.counter, 12u);
  EXPECT_FLOAT_EQ(back->sequences[1].sampling.params.temperature, 0.7f);
  EXPECT_EQ(back->sequences[0].token_mask, -1);
  EXPECT_EQ(back->sequences[1].token_mask, 1);
  EXPECT_EQ(back->token_masks, p.token_masks);
}

TEST(WireTest, EveryTruncationAndTrailingByteIsRefused) {
  const auto bytes = EncodeStep(SamplePlan());
  for (size_t n = 0; n < bytes.size(); ++n) {
    EXPECT_FALSE(DecodeStep({bytes.data(), n}).ok()) << n;
  }
  auto longer = bytes;
  longer.push_back(0);
  EXPECT_NE(DecodeStep(longer).status().message().find("trailing"), std::string::npos);
}

// A step result round-trips (values or ids, and the rank's time); every truncation, a trailing
// byte and a negative or absurd rank time are refused.
TEST(WireTest, StepResultsRoundTripWithTheRanksTime) {
  StepOutput out;
  out.rows = 2;
  out.width = 3;
  out.values = {1, -2, 3.5f, 0, 1e-30f, -7};
  out.rank_us = 12345;
  const auto bytes = EncodeStepOutput(out);
  auto back = DecodeStepOutput(bytes);
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(back->values, out.values);
  EXPECT_EQ(back->rank_us, 12345);
  StepOutput ids;
  ids.rows = 2;
  ids.ids = {7, 255999};
  auto ids_back = DecodeStepOutput(EncodeStepOutput(ids));
  ASSERT_TRUE(ids_back.ok());
  EXPECT_EQ(ids_back->ids, ids.ids);
  EXPECT_EQ(ids_back->rank_us, 0);
  for (size_t n = 0; n < bytes.size(); ++n) EXPECT_FALSE(DecodeStepOutput({bytes.data(), n}).ok()) << n;
  auto longer = bytes;
  longer.push_back(0);
  EXPECT_FALSE(DecodeStepOutput(longer).ok());
  for (int64_t bad : {int64_t{-1}, int64_t{86400} * 1000000 + 1}) {
    out.rank_us = bad;
    EXPECT_FALSE(DecodeStepOutput(EncodeStepOutput(out)).ok()) << bad;
  }
}

TEST(WireTest, CorruptFieldsAreRefusedBeforeAllocating) {
  // A token count of 2^31 in a short payload: refused, not allocated.
  Writer w;
  w.U8(0);
  w.U32(0);  // released
  w.U32(0);  // KV copies
  w.U32(0);  // KV block assignments
  w.U32(0);  // token masks
  w.U32(0);  // their words
  w.U32(1);
  w.I64(1);
  w.I64(0);
  w.U32(0x80000000u);
  EXPECT_NE(DecodeStep(w.out()).status().message().find("token count"), std::string::npos);
  // 2^31 block assignments: likewise.
  Writer a;
  a.U8(0);
  a.U32(0);
  a.U32(0);
  a.U32(0x80000000u);
  a.I64(1);
  EXPECT_NE(DecodeStep(a.out()).status().message().find("KV block assignments over the cap"),
            std::string::npos);
  // Output row past the tokens; a NaN temperature; a negative position; too many sequences.
  StepPlan p = SamplePlan();
  p.sequences[0].output_rows = {4};
  EXPECT_NE(DecodeStep(EncodeStep(p)).status().message().find("output row"), std::string::npos);
  p = SamplePlan();
  p.sequences[1].sampling.params.temperature = NAN;
  EXPECT_NE(DecodeStep(EncodeStep(p)).status().message().find("temperature"), std::string::npos);
  p = SamplePlan();
  p.sequences[0].start_pos = -1;
  EXPECT_FALSE(DecodeStep(EncodeStep(p)).ok());
  // Token masks: words past the payload (refused before allocating), a sequence naming a mask
  // that is not there.
  Writer masks;
  masks.U8(1);
  masks.U32(0);
  masks.U32(0);
  masks.U32(0);
  masks.U32(2);
  masks.U32(0x40000000u);
  masks.U64(1);
  masks.U64(1);
  EXPECT_NE(DecodeStep(masks.out()).status().message().find("token masks past the payload"),
            std::string::npos);
  p = SamplePlan();
  p.sequences[0].token_mask = 2;
  EXPECT_NE(DecodeStep(EncodeStep(p)).status().message().find("token mask that is not there"),
            std::string::npos);
  Writer many;
  many.U8(0);
  many.U32(0);
  many.U32(kMaxSequencesPerStep + 1);
  EXPECT_NE(DecodeStep(many.out()).status().message().find("over the cap"), std::string::npos);
}

TEST(WireTest, HeadersAreChecked) {
  const std::vector<uint8_t> payload = {1, 2, 3};
  auto frame = Frame(MessageType::kStep, payload);
  auto h = ParseHeader(frame);
  ASSERT_TRUE(h.ok());
  EXPECT_EQ(h->type, MessageType::kStep);
  EXPECT_EQ(h->payload_bytes, 3u);
  auto bad = frame;
  bad[0] ^= 1;
  EXPECT_NE(ParseHeader(bad).status().message().find("magic"), std::string::npos);
  bad = frame;
  bad[4] = 99;  // a version this build does not speak
  EXPECT_NE(ParseHeader(bad).status().message().find("version 99"), std::string::npos);
  bad = frame;
  bad[6] = 99;
  EXPECT_NE(ParseHeader(bad).status().message().find("unknown type 99"), std::string::npos);
  bad = frame;
  bad[11] = 0x7f;  // ~2 GB
  EXPECT_NE(ParseHeader(bad).status().message().find("exceeds"), std::string::npos);
  EXPECT_FALSE(ParseHeader({frame.data(), 11}).ok());
}

TEST(WireTest, StatusRoundTrips) {
  const Status st(StatusCode::kUnavailable, "rank 3 on host b: worker exited (signal 9)");
  Status back;
  ASSERT_TRUE(DecodeStatus(EncodeStatus(st), &back).ok());
  EXPECT_EQ(back.code(), StatusCode::kUnavailable);
  EXPECT_EQ(back.message(), st.message());
  auto bytes = EncodeStatus(st);
  bytes[0] = 200;
  EXPECT_FALSE(DecodeStatus(bytes, &back).ok());
}

// A KV pool's size (the coordinator's request, a worker's ready message): exactly 16 bytes,
// values in range.
TEST(WireTest, KvCapacityRoundTripsAndDamageIsRefused) {
  const auto bytes = EncodeKvCapacity({123456, 16});
  auto back = DecodeKvCapacity(bytes);
  ASSERT_TRUE(back.ok()) << back.status().message();
  EXPECT_EQ(back->blocks, 123456);
  EXPECT_EQ(back->block_size, 16);
  auto memory = DecodeKvCapacity(EncodeKvCapacity({}));
  ASSERT_TRUE(memory.ok());
  EXPECT_EQ(memory->blocks, 0);  // as many as memory allows
  EXPECT_FALSE(DecodeKvCapacity(EncodeKvCapacity({1, kMaxKvBlockSize + 1})).ok());
  EXPECT_FALSE(DecodeKvCapacity({}).ok());  // a between-steps heartbeat is not a ready message
  EXPECT_FALSE(DecodeKvCapacity(std::span(bytes).first(15)).ok());
  auto longer = bytes;
  longer.push_back(0);
  EXPECT_FALSE(DecodeKvCapacity(longer).ok());
  EXPECT_FALSE(DecodeKvCapacity(EncodeKvCapacity({-1, 16})).ok());
  EXPECT_FALSE(DecodeKvCapacity(EncodeKvCapacity({100, 0})).ok());
}

TEST(AuthTest, OnlyTheSecretHolderPassesAndAnswersDoNotReplay) {
  const std::string secret_text = "cluster secret 0123456789abcdef";
  const std::span<const uint8_t> secret(reinterpret_cast<const uint8_t*>(secret_text.data()),
                                        secret_text.size());
  const std::string wrong_text = "cluster secret 0123456789abcdeF";
  const std::span<const uint8_t> wrong(reinterpret_cast<const uint8_t*>(wrong_text.data()),
                                       wrong_text.size());
  auto n1 = FreshNonce(), n2 = FreshNonce();
  ASSERT_TRUE(n1.ok() && n2.ok());
  EXPECT_NE(*n1, *n2);
  const Mac mac = AuthMac(secret, *n1, 3);
  EXPECT_TRUE(VerifyAuth(secret, *n1, 3, mac));
  EXPECT_FALSE(VerifyAuth(secret, *n1, 4, mac));                     // another rank
  EXPECT_FALSE(VerifyAuth(secret, *n2, 3, mac));                     // replay against a new nonce
  EXPECT_FALSE(VerifyAuth(secret, *n1, 3, AuthMac(wrong, *n1, 3)));  // wrong secret
  EXPECT_FALSE(VerifyAuth(secret, *n1, 3, {mac.data(), 31}));        // truncated
}

}  // namespace
}  // namespace gemma2::rpc
