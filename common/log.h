// Logging for every program, through spdlog: one line per event on stderr, as text or JSON.
//   text: 2026-12-02T23:14:40.123Z info gemma2-launch: ready key=value ...
//   json: {"time":"2026-12-02T23:14:40.123Z","level":"info","program":"gemma2-launch","msg":"ready",...}
// Fields travel as JSON members, or as key=value after the message in text. Below the level set
// (--log-level) nothing is formatted. Every tool gets --log-level and --log-format through
// RunTool (cli/run_tool.h); a tool that never calls Init logs text at info.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "common/status.h"

namespace gemma2::log {

using Fields = std::vector<std::pair<std::string, std::string>>;

// level: trace, debug, info, warn, error, off; format: text or json.
Status Init(const std::string& program, const std::string& level, const std::string& format);
// The name the lines carry, e.g. "gemma2-worker[rank 3]" once the rank is known.
void SetProgram(const std::string& program);

void Debug(const std::string& msg, const Fields& fields = {});
void Info(const std::string& msg, const Fields& fields = {});
void Warn(const std::string& msg, const Fields& fields = {});
void Error(const std::string& msg, const Fields& fields = {});

}  // namespace gemma2::log
