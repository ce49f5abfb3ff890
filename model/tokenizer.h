// Gemma's sentencepiece tokenizer, its chat template and streaming detokenization.
#pragma once

#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "common/status.h"

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace gemma2 {

struct ChatMessage {
  std::string role;  // "system", "user", "assistant" (or "model")
  std::string content;
};

// How the chat template ends (the names are Hugging Face's apply_chat_template arguments).
struct ChatTemplateOptions {
  bool add_generation_prompt = true;    // end with "<start_of_turn>model\n": the model answers
  bool continue_final_message = false;  // leave the last turn open: the model continues it
};

class Tokenizer {
 public:
  static Result<std::unique_ptr<Tokenizer>> Load(const std::filesystem::path& model_file);
  ~Tokenizer();

  int64_t vocab_size() const;
  int32_t bos_id() const { return bos_; }
  // Text to ids with <bos> first, as Gemma expects.
  Result<std::vector<int32_t>> Encode(const std::string& text, bool add_bos = true) const;
  // Ids to text; special tokens (<bos>, <eos>, <pad>, turn markers) are left out unless
  // skip_special is false, which writes each as its piece ("<bos>").
  Result<std::string> Decode(const std::vector<int32_t>& ids, bool skip_special = true) const;
  // Each token's bytes as Decode writes them ("▁" a space, byte pieces their byte), so that a
  // sequence decodes to the concatenation; empty for control, unknown and unused pieces and the
  // turn markers (structured output never writes them).
  std::vector<std::string> TokenBytes() const;
  // Gemma's chat template: <bos><start_of_turn>user\n{text}<end_of_turn>\n ... then
  // <start_of_turn>model\n. A system message is merged into the first user turn; roles must
  // alternate user / model starting with user. continue_final_message leaves the last turn without
  // <end_of_turn> and adds no generation prompt (asking for both is an error).
  Result<std::vector<int32_t>> EncodeChat(const std::vector<ChatMessage>& messages,
                                          ChatTemplateOptions options = {}) const;

 private:
  Tokenizer() = default;
  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp_;
  bool IsSpecial(int32_t id) const;
  int32_t bos_ = 2, start_of_turn_ = -1, end_of_turn_ = -1;
};

// Turns a growing list of generated ids into text pieces for streaming. A piece never ends inside
// a UTF-8 character: bytes of an unfinished character are held back until it completes.
class IncrementalDetokenizer {
 public:
  explicit IncrementalDetokenizer(const Tokenizer& tok, bool skip_special = true)
      : tok_(tok), skip_special_(skip_special) {}
  // Appends `id`; returns the newly completed text (possibly empty).
  Result<std::string> Push(int32_t id);
  // Whatever is still held back (an unfinished character at the very end), as decoded.
  Result<std::string> Flush();

 private:
  const Tokenizer& tok_;
  bool skip_special_ = true;
  std::vector<int32_t> ids_;
  size_t prefix_ = 0;         // ids before `prefix_` are settled; decoding restarts there
  size_t emitted_bytes_ = 0;  // bytes of decode(ids_[prefix_:]) already returned
};

}  // namespace gemma2
