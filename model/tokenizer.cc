#include "model/tokenizer.h"

#include <sentencepiece_processor.h>

namespace gemma2 {
namespace {

std::string Trim(const std::string& s) {
  const char* ws = " \t\n\r\f\v";
  const size_t b = s.find_first_not_of(ws);
  if (b == std::string::npos) return "";
  return s.substr(b, s.find_last_not_of(ws) - b + 1);
}

// Length of the longest prefix of `s` that ends on a complete UTF-8 character and holds no
// replacement character produced for an unfinished byte sequence at its end.
size_t CompletePrefix(const std::string& s) {
  static const std::string kReplacement = "\xEF\xBF\xBD";
  size_t n = s.size();
  while (n >= kReplacement.size() &&
         s.compare(n - kReplacement.size(), kReplacement.size(), kReplacement) == 0) {
    n -= kReplacement.size();
  }
  // Also hold back a raw incomplete trailing sequence, if a decoder ever passes one through.
  size_t i = n;
  int back = 0;
  while (i > 0 && back < 4 && (static_cast<unsigned char>(s[i - 1]) & 0xC0) == 0x80) {
    --i;
    ++back;
  }
  if (i > 0) {
    const unsigned char lead = static_cast<unsigned char>(s[i - 1]);
    int need = 0;
    if (lead >= 0xF0)
      need = 3;
    else if (lead >= 0xE0)
      need = 2;
    else if (lead >= 0xC0)
      need = 1;
    if (need > back) return i - 1;
  }
  return n;
}

}  // namespace

Tokenizer::~Tokenizer() = default;

Result<std::unique_ptr<Tokenizer>> Tokenizer::Load(const std::filesystem::path& model_file) {
  std::unique_ptr<Tokenizer> t(new Tokenizer());
  t->sp_ = std::make_unique<sentencepiece::SentencePieceProcessor>();
  const auto st = t->sp_->Load(model_file.string());
  if (!st.ok())
    return DataLoss(model_file.string() + ": not a sentencepiece model: " + st.ToString());
  t->bos_ = t->sp_->bos_id() >= 0 ? t->sp_->bos_id() : 2;
  t->start_of_turn_ = t->sp_->PieceToId("<start_of_turn>");
  t->end_of_turn_ = t->sp_->PieceToId("<end_of_turn>");
  if (t->start_of_turn_ == t->sp_->unk_id()) t->start_of_turn_ = -1;
  if (t->end_of_turn_ == t->sp_->unk_id()) t->end_of_turn_ = -1;
  return t;
}

int64_t Tokenizer::vocab_size() const { return sp_->GetPieceSize(); }

Result<std::vector<int32_t>> Tokenizer::Encode(const std::string& text, bool add_bos) const {
  std::vector<int> ids;
  const auto st = sp_->Encode(text, &ids);
  if (!st.ok()) return InvalidArgument("cannot tokenize: " + st.ToString());
  std::vector<int32_t> out;
  if (add_bos) out.push_back(bos_);
  out.insert(out.end(), ids.begin(), ids.end());
  return out;
}

bool Tokenizer::IsSpecial(int32_t id) const {
  return sp_->IsControl(id) || id == start_of_turn_ || id == end_of_turn_;
}

std::vector<std::string> Tokenizer::TokenBytes() const {
  const int n = sp_->GetPieceSize();
  std::vector<std::string> out(static_cast<size_t>(n));
  for (int id = 0; id < n; ++id) {
    if (IsSpecial(id) || sp_->IsUnknown(id) || sp_->IsUnused(id)) continue;
    const std::string piece = sp_->IdToPiece(id);
    std::string& bytes = out[static_cast<size_t>(id)];
    if (sp_->IsByte(id)) {  // "<0xAB>"
      bytes.push_back(static_cast<char>(std::stoi(piece.substr(3, 2), nullptr, 16)));
      continue;
    }
    for (size_t i = 0; i < piece.size();) {
      if (piece.compare(i, 3, "\xe2\x96\x81") == 0) {  // U+2581 LOWER ONE EIGHTH BLOCK
        bytes.push_back(' ');
        i += 3;
      } else {
        bytes.push_back(piece[i++]);
      }
    }
  }
  return out;
}

Result<std::string> Tokenizer::Decode(const std::vector<int32_t>& ids, bool skip_special) const {
  std::string text;
  std::vector<int> run;  // ordinary pieces since the last special one, decoded together
  auto flush = [&]() -> Status {
    std::string piece;
    const auto st = sp_->Decode(run, &piece);
    if (!st.ok()) return Internal("cannot detokenize: " + st.ToString());
    text += piece;
    run.clear();
    return OkStatus();
  };
  for (int32_t id : ids) {
    if (id < 0 || id >= sp_->GetPieceSize()) {
      return InvalidArgument("token id " + std::to_string(id) + " outside the tokenizer's " +
                             std::to_string(sp_->GetPieceSize()) + " pieces");
    }
    if (!IsSpecial(id)) {
      run.push_back(id);
    } else if (!skip_special) {
      RETURN_IF_ERROR(flush());
      text += sp_->IdToPiece(id);
    }
  }
  RETURN_IF_ERROR(flush());
  return text;
}

Result<std::vector<int32_t>> Tokenizer::EncodeChat(const std::vector<ChatMessage>& messages,
                                                   ChatTemplateOptions options) const {
  if (start_of_turn_ < 0 || end_of_turn_ < 0) {
    return InvalidArgument(
        "this tokenizer has no <start_of_turn>/<end_of_turn> pieces: no chat template");
  }
  if (messages.empty()) return InvalidArgument("chat needs at least one message");
  if (options.continue_final_message && options.add_generation_prompt) {
    return InvalidArgument(
        "continue_final_message and add_generation_prompt cannot both be true: the first "
        "continues the last turn, the second opens a new one");
  }
  std::vector<ChatMessage> turns;
  std::string system;
  for (size_t i = 0; i < messages.size(); ++i) {
    const auto& m = messages[i];
    if (m.role == "system") {
      if (i != 0) return InvalidArgument("a system message may only come first");
      system = m.content;
      continue;
    }
    const std::string role = m.role == "assistant" ? "model" : m.role;
    if (role != "user" && role != "model") {
      return InvalidArgument("unknown chat role '" + m.role + "' (system, user, assistant)");
    }
    const std::string expected = turns.size() % 2 == 0 ? "user" : "model";
    if (role != expected) {
      return InvalidArgument("conversation roles must alternate user/assistant/user/...");
    }
    turns.push_back({role, Trim(m.content)});
  }
  if (turns.empty()) return InvalidArgument("chat needs a user message");
  // As Gemma's template: the system text and a blank line open the first user turn.
  if (!system.empty()) turns[0].content = system + "\n\n" + turns[0].content;
  std::vector<int32_t> ids = {bos_};
  auto append = [&](const std::string& text) -> Status {
    ASSIGN_OR_RETURN(auto piece, Encode(text, /*add_bos=*/false));
    ids.insert(ids.end(), piece.begin(), piece.end());
    return OkStatus();
  };
  for (size_t i = 0; i < turns.size(); ++i) {
    ids.push_back(start_of_turn_);
    RETURN_IF_ERROR(append(turns[i].role + "\n" + turns[i].content));
    if (options.continue_final_message && i + 1 == turns.size()) return ids;  // left open
    ids.push_back(end_of_turn_);
    RETURN_IF_ERROR(append("\n"));
  }
  if (options.add_generation_prompt) {
    ids.push_back(start_of_turn_);
    RETURN_IF_ERROR(append("model\n"));
  }
  return ids;
}

Result<std::string> IncrementalDetokenizer::Push(int32_t id) {
  ids_.push_back(id);
  ASSIGN_OR_RETURN(std::string text,
                   tok_.Decode({ids_.begin() + static_cast<std::ptrdiff_t>(prefix_), ids_.end()},
                               skip_special_));
  const size_t complete = CompletePrefix(text);
  if (complete <= emitted_bytes_) return std::string();
  std::string piece = text.substr(emitted_bytes_, complete - emitted_bytes_);
  emitted_bytes_ = complete;
  if (complete == text.size() && ids_.size() - prefix_ > 8) {
    // Everything decoded so far is settled: restart the window to keep decoding O(1) per token.
    // Keep one id of context so a leading space is decoded as it would be mid-text.
    ASSIGN_OR_RETURN(std::string tail, tok_.Decode({ids_.end() - 1, ids_.end()}, skip_special_));
    prefix_ = ids_.size() - 1;
    emitted_bytes_ = tail.size();
  }
  return piece;
}

Result<std::string> IncrementalDetokenizer::Flush() {
  ASSIGN_OR_RETURN(std::string text,
                   tok_.Decode({ids_.begin() + static_cast<std::ptrdiff_t>(prefix_), ids_.end()},
                               skip_special_));
  std::string rest = text.size() > emitted_bytes_ ? text.substr(emitted_bytes_) : std::string();
  emitted_bytes_ = text.size();
  return rest;
}

}  // namespace gemma2
