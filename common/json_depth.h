// A bound on JSON nesting checked before parsing text from a file or a peer (a checkpoint's
// config, a server's answer): nlohmann's callback parser, dump() and comparisons recurse once per
// level, so a value with megabytes of brackets would exhaust the stack where it is used. The
// request bodies the server parses have their own guard (serving/request_parser.h ParseJsonBody).
#pragma once

#include <string_view>

namespace gemma2 {

// Nesting deeper than this in a file or an answer is refused (OpenAI's answers and Hugging Face's
// configs nest under 10).
inline constexpr int kMaxPeerJsonDepth = 64;

// Whether `text` nests objects and arrays at most `max_depth` deep (string contents skipped; the
// text need not be valid JSON).
inline bool JsonNestingWithin(std::string_view text, int max_depth) {
  int depth = 0;
  bool in_string = false, escaped = false;
  for (const char c : text) {
    if (in_string) {
      if (escaped) {
        escaped = false;
      } else if (c == '\\') {
        escaped = true;
      } else if (c == '"') {
        in_string = false;
      }
    } else if (c == '"') {
      in_string = true;
    } else if (c == '{' || c == '[') {
      if (++depth > max_depth) return false;
    } else if (c == '}' || c == ']') {
      --depth;
    }
  }
  return true;
}

}  // namespace gemma2
