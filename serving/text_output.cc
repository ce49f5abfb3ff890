#include "serving/text_output.h"

#include <algorithm>

namespace gemma2::serving {

TextOutput::TextOutput(const Tokenizer* tok, std::vector<std::string> stop, bool include_stop,
                       bool skip_special)
    : stop_(std::move(stop)), include_stop_(include_stop) {
  if (tok) detok_.emplace(*tok, skip_special);
}

TextOutput::Piece TextOutput::Feed(std::string more) {
  held_ += more;
  Piece p;
  // The earliest stop string wins; the text before it is released, the rest dropped.
  size_t cut = std::string::npos;
  const std::string* matched = nullptr;
  for (const auto& s : stop_) {
    const size_t at = held_.find(s);
    if (at < cut) {
      cut = at;
      matched = &s;
    }
  }
  if (matched) {
    p.text = held_.substr(0, cut + (include_stop_ ? matched->size() : 0));
    p.hit_stop = true;
    p.stop = *matched;
    held_.clear();
    return p;
  }
  // Hold back the longest tail of held_ that is a proper prefix of some stop string.
  size_t keep = 0;
  for (const auto& s : stop_) {
    for (size_t len = std::min(s.size() - 1, held_.size()); len > keep; --len) {
      if (held_.compare(held_.size() - len, len, s, 0, len) == 0) {
        keep = len;
        break;
      }
    }
  }
  p.text = held_.substr(0, held_.size() - keep);
  held_.erase(0, held_.size() - keep);
  return p;
}

Result<TextOutput::Piece> TextOutput::Push(int32_t id) {
  if (!detok_) return Piece{};  // token-id-only model: no text
  ASSIGN_OR_RETURN(std::string more, detok_->Push(id));
  return Feed(std::move(more));
}

Result<std::string> TextOutput::Finish() {
  std::string rest;
  if (detok_) {
    ASSIGN_OR_RETURN(rest, detok_->Flush());
  }
  Piece p = Feed(std::move(rest));
  if (p.hit_stop) return p.text;
  return p.text + std::exchange(held_, std::string());
}

}  // namespace gemma2::serving
