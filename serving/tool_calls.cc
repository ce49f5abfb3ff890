#include "serving/tool_calls.h"

#include <algorithm>
#include <cctype>
#include <random>

#include "serving/request_parser.h"

namespace gemma2::serving {
namespace {

using json = nlohmann::ordered_json;

ApiError Bad(std::string param, std::string message) { return BadRequest(std::move(param), std::move(message)); }

// JSON text inside a string, nesting bounded; discarded when not JSON or too deep.
json Embedded(std::string_view text) {
  auto parsed = ParseJsonBody(text, kMaxEmbeddedJsonDepth);
  if (auto* j = std::get_if<json>(&parsed)) return std::move(*j);
  return json(json::value_t::discarded);
}

// OpenAI's rule for function names: a-z, A-Z, 0-9, underscores and dashes, at most 64.
bool ValidName(const std::string& n) {
  return !n.empty() && n.size() <= 64 && std::all_of(n.begin(), n.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '-';
  });
}

std::string CallId() {
  thread_local std::mt19937_64 rng{std::random_device{}()};
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string id = "call_";
  for (int i = 0; i < 24; ++i) id += kDigits[rng() % 16];
  return id;
}

// One call as the model writes it, or null.
json Call(const json& v, const std::vector<std::string>& names) {
  if (!v.is_object() || !v.contains("name") || !v["name"].is_string()) return nullptr;
  for (auto it = v.begin(); it != v.end(); ++it) {
    if (it.key() != "name" && it.key() != "arguments") return nullptr;
  }
  const std::string name = v["name"].get<std::string>();
  if (std::find(names.begin(), names.end(), name) == names.end()) return nullptr;
  const json args = v.contains("arguments") ? v["arguments"] : json::object();
  if (!args.is_object()) return nullptr;
  return json{{"id", CallId()},
              {"type", "function"},
              {"function", {{"name", name}, {"arguments", args.dump()}}}};
}

}  // namespace

std::variant<ToolRequest, ApiError> ParseTools(const json* tools, const json* tool_choice,
                                               const json* parallel) {
  ToolRequest r;
  if (parallel) {
    if (!parallel->is_boolean())
      return Bad("parallel_tool_calls", "'parallel_tool_calls' must be a boolean");
    r.parallel = parallel->get<bool>();
  }
  if (tools) {
    if (!tools->is_array()) return Bad("tools", "'tools' must be a list");
    if (tools->size() > kMaxTools)
      return Bad("tools", std::to_string(tools->size()) + " tools; the limit is " +
                              std::to_string(kMaxTools));
    for (const json& t : *tools) {
      if (!t.is_object() || t.value("type", "") != "function" || !t.contains("function") ||
          !t["function"].is_object())
        return Bad("tools", "every tool must be {\"type\": \"function\", \"function\": {...}}");
      for (auto it = t.begin(); it != t.end(); ++it) {
        if (it.key() != "type" && it.key() != "function")
          return Bad("tools", "unknown field '" + it.key() + "' in a tool");
      }
      const json& f = t["function"];
      for (auto it = f.begin(); it != f.end(); ++it) {
        static const std::vector<std::string> kKnown = {"name", "description", "parameters", "strict"};
        if (std::find(kKnown.begin(), kKnown.end(), it.key()) == kKnown.end())
          return Bad("tools", "unknown field '" + it.key() + "' in a tool's function");
      }
      if (!f.contains("name") || !f["name"].is_string() || !ValidName(f["name"].get<std::string>()))
        return Bad("tools", "a function's 'name' must be 1 to 64 of a-z, A-Z, 0-9, _ and -");
      const std::string name = f["name"].get<std::string>();
      if (std::find(r.use.names.begin(), r.use.names.end(), name) != r.use.names.end())
        return Bad("tools", "the function '" + name + "' is offered twice");
      json params = f.contains("parameters") ? f["parameters"] : json();
      if (!params.is_null() && !params.is_object())
        return Bad("tools", "function '" + name + "': 'parameters' must be a JSON Schema object");
      if (f.contains("description") && !f["description"].is_string() && !f["description"].is_null())
        return Bad("tools", "function '" + name + "': 'description' must be a string");
      r.use.names.push_back(name);
      r.callable.push_back({name, params});
      json shown = {{"name", name}};
      if (f.contains("description") && f["description"].is_string()) shown["description"] = f["description"];
      shown["parameters"] = params.is_null() ? json::object() : params;
      r.offered.push_back(std::move(shown));
    }
  }
  // OpenAI: "none" without tools, "auto" with them.
  r.use.choice = r.use.names.empty() ? ToolUse::Choice::kNone : ToolUse::Choice::kAuto;
  if (tool_choice) {
    if (tool_choice->is_string()) {
      const std::string c = tool_choice->get<std::string>();
      if (c == "none") {
        r.use.choice = ToolUse::Choice::kNone;
      } else if (c == "auto") {
        r.use.choice = ToolUse::Choice::kAuto;
      } else if (c == "required") {
        r.use.choice = ToolUse::Choice::kRequired;
      } else {
        return Bad("tool_choice", "'tool_choice' must be none, auto, required or "
                                  "{\"type\": \"function\", \"function\": {\"name\": ...}}");
      }
    } else if (tool_choice->is_object() && tool_choice->value("type", "") == "function" &&
               tool_choice->contains("function") && (*tool_choice)["function"].is_object() &&
               (*tool_choice)["function"].contains("name") &&
               (*tool_choice)["function"]["name"].is_string()) {
      const std::string name = (*tool_choice)["function"]["name"].get<std::string>();
      const auto it = std::find(r.use.names.begin(), r.use.names.end(), name);
      if (it == r.use.names.end())
        return Bad("tool_choice", "tool_choice names '" + name + "', which is not among 'tools'");
      r.use.choice = ToolUse::Choice::kNamed;
      r.callable = {r.callable[static_cast<size_t>(it - r.use.names.begin())]};
      r.use.names = {name};
    } else {
      return Bad("tool_choice", "'tool_choice' must be none, auto, required or "
                                "{\"type\": \"function\", \"function\": {\"name\": ...}}");
    }
    if (r.use.choice != ToolUse::Choice::kNone && r.use.names.empty())
      return Bad("tool_choice", "'tool_choice' asks for calls, but 'tools' offers none");
  }
  return r;
}

std::string ToolPrompt(const ToolRequest& r) {
  if (!r.use.parses()) return "";
  std::string text = "You can call these functions (their arguments as JSON Schema):\n" +
                     r.offered.dump() + "\n\n";
  const std::string how =
      "answer with only a JSON object {\"name\": the function's name, \"arguments\": an object "
      "of its arguments}" +
      std::string(r.parallel ? ", or a JSON list of such objects to make several calls," : "") +
      " and nothing else.";
  switch (r.use.choice) {
    case ToolUse::Choice::kNamed:
      return text + "Call the function " + r.use.names[0] + ": " + how;
    case ToolUse::Choice::kRequired:
      return text + "Call one of them: " + how;
    default:
      return text + "To call functions, " + how + " Otherwise answer in text.";
  }
}

std::variant<std::string, ApiError> RenderCalls(const json& tool_calls,
                                                std::map<std::string, std::string>& names) {
  if (!tool_calls.is_array())
    return Bad("messages", "an assistant message's 'tool_calls' must be a list");
  json calls = json::array();
  for (const json& c : tool_calls) {
    if (!c.is_object() || !c.contains("function") || !c["function"].is_object() ||
        !c["function"].contains("name") || !c["function"]["name"].is_string())
      return Bad("messages", "every tool call needs 'function': {'name', 'arguments'}");
    const json& f = c["function"];
    json args = json::object();
    if (f.contains("arguments") && f["arguments"].is_string()) {
      args = Embedded(f["arguments"].get<std::string>());
      if (args.is_discarded()) args = f["arguments"];  // not JSON (or too deep): kept as text
    } else if (f.contains("arguments") && !f["arguments"].is_null()) {
      args = f["arguments"];
    }
    const std::string name = f["name"].get<std::string>();
    if (c.contains("id") && c["id"].is_string()) names[c["id"].get<std::string>()] = name;
    calls.push_back({{"name", name}, {"arguments", args}});
  }
  if (calls.empty()) return std::string();
  return calls.size() == 1 ? calls[0].dump() : calls.dump();
}

std::string ToolResultHeader(const std::string& call_id,
                             const std::map<std::string, std::string>& names) {
  const auto it = names.find(call_id);
  if (it == names.end()) return "Result of the call " + call_id + ":";
  return "Result of " + it->second + " (call " + call_id + "):";
}

nlohmann::json ToolCallStream::Feed(std::string_view text) {
  nlohmann::json deltas = nlohmann::json::array();
  auto fragment = [&](size_t from, size_t to) {
    if (to <= from) return;
    const std::string piece(text.substr(from, to - from));
    arguments_.back() += piece;
    deltas.push_back({{"index", calls_ - 1}, {"function", {{"arguments", piece}}}});
  };
  while (pos_ < text.size() && phase_ != Phase::kBroken && phase_ != Phase::kDone) {
    const char c = text[pos_];
    switch (phase_) {
      case Phase::kStart:  // a list of calls or one call
        if (c == '[') {
          list_ = true;
          phase_ = Phase::kBetween;
          ++pos_;
        } else {
          phase_ = Phase::kBetween;
        }
        break;
      case Phase::kBetween:  // the next call's '{'
        if (c != '{') {
          phase_ = Phase::kBroken;
          break;
        }
        header_begin_ = pos_++;
        phase_ = Phase::kHeader;
        break;
      case Phase::kHeader: {  // {"name":"NAME","arguments":
        static constexpr std::string_view kName = "{\"name\":", kArgs = ",\"arguments\":";
        const std::string_view seen = text.substr(header_begin_);
        const size_t args = seen.find(kArgs);
        if (seen.substr(0, std::min(seen.size(), kName.size())) !=
            kName.substr(0, std::min(seen.size(), kName.size()))) {
          phase_ = Phase::kBroken;
          break;
        }
        if (args == std::string_view::npos) {  // the name is not whole yet (at most 64 bytes)
          if (seen.size() > kName.size() + 66 + kArgs.size()) phase_ = Phase::kBroken;
          pos_ = text.size();
          break;
        }
        const json name = Embedded(seen.substr(kName.size(), args - kName.size()));
        if (!name.is_string()) {
          phase_ = Phase::kBroken;
          break;
        }
        names_.push_back(name.get<std::string>());
        arguments_.emplace_back();
        deltas.push_back({{"index", calls_},
                          {"id", CallId()},
                          {"type", "function"},
                          {"function", {{"name", names_.back()}, {"arguments", ""}}}});
        ++calls_;
        pos_ = header_begin_ + args + kArgs.size();
        depth_ = 0;
        in_string_ = escaped_ = false;
        phase_ = Phase::kArguments;
        break;
      }
      case Phase::kArguments: {  // to the call's closing '}', outside strings and brackets
        const size_t from = pos_;
        for (; pos_ < text.size(); ++pos_) {
          const char b = text[pos_];
          if (in_string_) {
            if (escaped_)
              escaped_ = false;
            else if (b == '\\')
              escaped_ = true;
            else if (b == '"')
              in_string_ = false;
          } else if (b == '"') {
            in_string_ = true;
          } else if (b == '{' || b == '[') {
            ++depth_;
          } else if ((b == '}' || b == ']') && depth_ > 0) {
            --depth_;
          } else if (b == '}') {
            break;
          }
        }
        fragment(from, pos_);
        if (pos_ < text.size()) {  // the call's '}'
          ++pos_;
          phase_ = list_ ? Phase::kAfterCall : Phase::kDone;
        }
        break;
      }
      case Phase::kAfterCall:  // ',' and the next call, or the list's ']'
        if (c == ',') {
          ++pos_;
          phase_ = Phase::kBetween;
        } else if (c == ']') {
          ++pos_;
          phase_ = Phase::kDone;
        } else {
          phase_ = Phase::kBroken;
        }
        break;
      default:
        break;
    }
  }
  return deltas;
}

nlohmann::json ParseToolCalls(std::string_view text, const std::vector<std::string>& names) {
  const size_t begin = text.find_first_not_of(" \t\r\n");
  if (begin == std::string_view::npos) return nullptr;
  const json v = Embedded(text.substr(begin));
  if (v.is_discarded()) return nullptr;
  nlohmann::json calls = nlohmann::json::array();
  if (v.is_array()) {
    if (v.empty()) return nullptr;
    for (const json& e : v) {
      json c = Call(e, names);
      if (c.is_null()) return nullptr;
      calls.push_back(nlohmann::json(c));
    }
  } else {
    json c = Call(v, names);
    if (c.is_null()) return nullptr;
    calls.push_back(nlohmann::json(c));
  }
  // The arguments as the model wrote them, where the text has the calls' own form (as a stream
  // sends them); otherwise as parsed.
  ToolCallStream raw;
  raw.Feed(text.substr(begin));
  if (!raw.broken() && raw.arguments().size() == calls.size()) {
    for (size_t k = 0; k < calls.size(); ++k) {
      if (raw.names()[k] == calls[k]["function"]["name"])
        calls[k]["function"]["arguments"] = raw.arguments()[k];
    }
  }
  return calls;
}

}  // namespace gemma2::serving
