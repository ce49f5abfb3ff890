// Tool calling for Gemma 2, which has no tool tokens; the format is this server's
// (docs/design.md, "Tool calling"):
//  - the functions offered open the conversation (after any system text, so in the first user
//    turn): ToolPrompt's instruction and a JSON list of {name, description, parameters};
//  - the model calls by answering with only {"name": NAME, "arguments": {...}} or a JSON list of
//    such objects (tool_choice "required" and named choices are constrained to exactly that);
//  - an assistant message's tool_calls are written back the same way, and a "tool" message
//    becomes a user turn "Result of NAME (call ID):" followed by its content.
#pragma once

#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "serving/api.h"
#include "structured/json_schema.h"

namespace gemma2::serving {

inline constexpr size_t kMaxTools = 128;

struct ToolRequest {
  ToolUse use;
  std::vector<structured::ToolSchema> callable;  // what the reply may call (named: that one)
  nlohmann::ordered_json offered = nlohmann::ordered_json::array();  // for the prompt
  bool parallel = true;  // parallel_tool_calls: a list of calls may come
};

// OpenAI's tools, tool_choice and parallel_tool_calls (each null when absent).
std::variant<ToolRequest, ApiError> ParseTools(const nlohmann::ordered_json* tools,
                                               const nlohmann::ordered_json* tool_choice,
                                               const nlohmann::ordered_json* parallel);

// The text that opens the conversation for `request` ("" when no call may be made).
std::string ToolPrompt(const ToolRequest& request);

// An assistant message's tool_calls as the model writes calls; remembers each id's function
// name in `names` for the tool messages that answer them. Arguments that are not JSON stay a
// string.
std::variant<std::string, ApiError> RenderCalls(const nlohmann::ordered_json& tool_calls,
                                                std::map<std::string, std::string>& names);

// The opening line of a tool message's turn.
std::string ToolResultHeader(const std::string& call_id,
                             const std::map<std::string, std::string>& names);

// Calls as the model writes them, for a stream: fed the reply's text so far (it only grows), Feed
// gives OpenAI's tool-call deltas for what is new: a call's opening ({index, id, type: function,
// function: {name, arguments: ""}}) once its name is read, then the text of its arguments in
// fragments as they come ({index, function: {arguments}}). It reads the form the calls' grammar
// writes ({"name":NAME,"arguments":ARGS}, or a list of them, no space between); text of another
// form stops it (broken()), and nothing more is given.
class ToolCallStream {
 public:
  nlohmann::json Feed(std::string_view text);
  bool started() const { return calls_ > 0; }
  bool broken() const { return phase_ == Phase::kBroken; }
  // The raw text of each call's arguments read so far, and each call's name.
  const std::vector<std::string>& arguments() const { return arguments_; }
  const std::vector<std::string>& names() const { return names_; }

 private:
  enum class Phase { kStart, kBetween, kHeader, kArguments, kAfterCall, kDone, kBroken };
  Phase phase_ = Phase::kStart;
  bool list_ = false;
  size_t pos_ = 0;           // bytes of the text read
  size_t header_begin_ = 0;  // where the current call's '{' is
  int depth_ = 0;            // brackets open inside the arguments
  bool in_string_ = false, escaped_ = false;
  int calls_ = 0;
  std::vector<std::string> arguments_, names_;
};

// A finished reply as OpenAI's tool_calls ([{id, type, function: {name, arguments}}], arguments
// the JSON text of the arguments as the model wrote them), or null when the reply is not calls of
// `names` alone.
nlohmann::json ParseToolCalls(std::string_view text, const std::vector<std::string>& names);

}  // namespace gemma2::serving
