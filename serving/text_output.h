// Generated ids -> the text a choice may release: streaming detokenization (no split UTF-8
// characters) plus OpenAI stop strings (the match and everything after it are dropped; text that
// could still become a stop string is held back).
#pragma once

#include <string>
#include <vector>

#include "common/status.h"
#include "model/tokenizer.h"

namespace gemma2::serving {

class TextOutput {
 public:
  // include_stop: the matched stop string stays in the text (vLLM's include_stop_str_in_output);
  // skip_special false: special tokens are written as their pieces (vLLM's skip_special_tokens).
  TextOutput(const Tokenizer* tok, std::vector<std::string> stop, bool include_stop = false,
             bool skip_special = true);
  struct Piece {
    std::string text;       // newly released
    bool hit_stop = false;  // a stop string matched: the choice ends here
    std::string stop;       // which one
  };
  // Feeds one generated id (special tokens add no text unless skip_special is false).
  Result<Piece> Push(int32_t id);
  // Feeds decoded text (what Push does after detokenizing).
  Piece Feed(std::string text);
  // At the end of the choice (not after a stop hit): everything still held back.
  Result<std::string> Finish();

 private:
  std::optional<IncrementalDetokenizer> detok_;
  std::vector<std::string> stop_;
  bool include_stop_ = false;
  std::string held_;  // decoded text not yet released (could start a stop string)
};

}  // namespace gemma2::serving
