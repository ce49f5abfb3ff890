#include "model/tokenizer.h"

#include <gtest/gtest.h>

#include <filesystem>

namespace gemma2 {
namespace {

// Gemma's real vocabulary, beside the checkout (../shared); tests skip without it.
std::filesystem::path GemmaTokenizerPath() {
  return std::filesystem::path(GEMMA2_SOURCE_DIR) / "../shared/tokenizers/gemma2-tokenizer.model";
}

class GemmaTokenizerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!std::filesystem::exists(GemmaTokenizerPath())) {
      GTEST_SKIP() << "skipped: ../shared/tokenizers/gemma2-tokenizer.model is absent";
    }
    auto t = Tokenizer::Load(GemmaTokenizerPath());
    ASSERT_TRUE(t.ok()) << t.status().ToString();
    tok_ = std::move(t).value();
  }
  std::unique_ptr<Tokenizer> tok_;
};

bool IsWellFormedUtf8(const std::string& s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    const size_t len = c < 0x80         ? 1
                       : (c >> 5) == 6  ? 2
                       : (c >> 4) == 14 ? 3
                       : (c >> 3) == 30 ? 4
                                        : 0;
    if (len == 0 || i + len > s.size()) return false;
    for (size_t k = 1; k < len; ++k) {
      if ((static_cast<unsigned char>(s[i + k]) & 0xC0) != 0x80) return false;
    }
    i += len;
  }
  return true;
}

TEST_F(GemmaTokenizerTest, EncodesAsGemmaPublishedExamplesShow) {
  auto ids = tok_->Encode("Hello, my dog is cute");
  ASSERT_TRUE(ids.ok());
  EXPECT_EQ(*ids, (std::vector<int32_t>{2, 4521, 235269, 970, 5929, 603, 9786}));
  EXPECT_EQ(tok_->vocab_size(), 256000);
  auto text = tok_->Decode(*ids);
  ASSERT_TRUE(text.ok());
  EXPECT_EQ(*text, "Hello, my dog is cute");
}

TEST_F(GemmaTokenizerTest, ChatTemplateMergesSystemIntoFirstUserTurn) {
  auto ids = tok_->EncodeChat({{"system", "Be brief."},
                               {"user", " Hi there \n"},
                               {"assistant", "Hello."},
                               {"user", "Bye"}});
  ASSERT_TRUE(ids.ok()) << ids.status().ToString();
  // The same text through the tokenizer, markers written as their ids.
  std::vector<int32_t> expect = {2, 106};
  auto add = [&](const std::string& s) {
    auto p = tok_->Encode(s, false);
    expect.insert(expect.end(), p->begin(), p->end());
  };
  add("user\nBe brief.\n\nHi there");
  expect.push_back(107);
  add("\n");
  expect.push_back(106);
  add("model\nHello.");
  expect.push_back(107);
  add("\n");
  expect.push_back(106);
  add("user\nBye");
  expect.push_back(107);
  add("\n");
  expect.push_back(106);
  add("model\n");
  EXPECT_EQ(*ids, expect);

  EXPECT_FALSE(tok_->EncodeChat({}).ok());
  EXPECT_FALSE(tok_->EncodeChat({{"assistant", "x"}}).ok());
  EXPECT_FALSE(tok_->EncodeChat({{"user", "a"}, {"user", "b"}}).ok());
  EXPECT_FALSE(tok_->EncodeChat({{"user", "a"}, {"system", "b"}}).ok());
  EXPECT_FALSE(tok_->EncodeChat({{"tool", "a"}}).ok());
}

// add_generation_prompt false ends after the last turn; continue_final_message leaves the last
// turn open (Hugging Face cuts its rendering right after that message's text); both is an error.
TEST_F(GemmaTokenizerTest, ChatTemplateEndsAsAskedFor) {
  const std::vector<ChatMessage> chat = {{"user", "Hi"}, {"assistant", "Hello, I am"}};
  auto full = tok_->EncodeChat({{"user", "Hi"}});
  auto closed = tok_->EncodeChat(chat, {.add_generation_prompt = false});
  auto open = tok_->EncodeChat(chat, {.add_generation_prompt = false,
                                      .continue_final_message = true});
  ASSERT_TRUE(full.ok() && closed.ok() && open.ok());
  auto piece = [&](const std::string& s) { return *tok_->Encode(s, false); };
  std::vector<int32_t> expect = {2, 106};
  auto add = [&](const std::vector<int32_t>& p) { expect.insert(expect.end(), p.begin(), p.end()); };
  add(piece("user\nHi"));
  expect.push_back(107);
  add(piece("\n"));
  EXPECT_EQ(std::vector<int32_t>(full->begin(), full->begin() + expect.size()), expect);
  expect.push_back(106);
  add(piece("model\nHello, I am"));
  EXPECT_EQ(*open, expect);
  expect.push_back(107);
  add(piece("\n"));
  EXPECT_EQ(*closed, expect);
  EXPECT_FALSE(tok_->EncodeChat(chat, {.add_generation_prompt = true,
                                       .continue_final_message = true}).ok());
}

// skip_special false writes special tokens as their pieces, in place; true leaves them out.
TEST_F(GemmaTokenizerTest, SpecialTokensAreShownWhenNotSkipped) {
  std::vector<int32_t> ids = {2, 106};
  const auto hi = *tok_->Encode("model\nHi there", false);
  ids.insert(ids.end(), hi.begin(), hi.end());
  ids.push_back(107);
  ids.push_back(1);
  EXPECT_EQ(*tok_->Decode(ids), "model\nHi there");
  EXPECT_EQ(*tok_->Decode(ids, /*skip_special=*/false),
            "<bos><start_of_turn>model\nHi there<end_of_turn><eos>");
  IncrementalDetokenizer streamed(*tok_, /*skip_special=*/false);
  std::string text;
  for (int32_t id : ids) text += *streamed.Push(id);
  text += *streamed.Flush();
  EXPECT_EQ(text, "<bos><start_of_turn>model\nHi there<end_of_turn><eos>");
}

TEST_F(GemmaTokenizerTest, StreamingNeverSplitsACharacter) {
  const std::vector<std::string> texts = {
      "Plain ASCII text, with   spaces\tand tabs.",
      "Emoji 🙂🚀👩‍👩‍👧 and CJK 日本語のテキスト, Arabic مرحبا, Cyrillic "
      "Привет.",
      "Rare: 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ꙮ 𓀀 and digits 1234567890 " + std::string(300, 'x'),
  };
  for (const auto& text : texts) {
    auto ids = tok_->Encode(text, false);
    ASSERT_TRUE(ids.ok());
    IncrementalDetokenizer detok(*tok_);
    std::string streamed;
    int held_back = 0;
    for (int32_t id : *ids) {
      auto piece = detok.Push(id);
      ASSERT_TRUE(piece.ok());
      EXPECT_TRUE(IsWellFormedUtf8(*piece)) << "piece splits a character";
      if (piece->empty()) ++held_back;
      streamed += *piece;
    }
    auto rest = detok.Flush();
    ASSERT_TRUE(rest.ok());
    streamed += *rest;
    EXPECT_EQ(streamed, *tok_->Decode(*ids));
    EXPECT_EQ(streamed, text);
    if (text.find("𓀀") != std::string::npos) {
      EXPECT_GT(held_back, 0) << "byte fallback never exercised";
    }
  }
}

TEST(TokenizerTest, RejectsANonModelFile) {
  auto t = Tokenizer::Load(std::filesystem::path(GEMMA2_SOURCE_DIR) / "README.md");
  EXPECT_FALSE(t.ok());
}

}  // namespace
}  // namespace gemma2
