#include "common/log.h"

#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>

#include <chrono>
#include <ctime>
#include <mutex>
#include <nlohmann/json.hpp>

namespace gemma2::log {
namespace {

struct State {
  std::mutex mu;
  std::string program = "gemma2";
  bool json = false;
  std::shared_ptr<spdlog::logger> logger;
};

State& state() {
  static State s;
  return s;
}

std::string NowUtc() {
  const auto now = std::chrono::system_clock::now();
  const std::time_t t = std::chrono::system_clock::to_time_t(now);
  const auto ms =
      std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count() % 1000;
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[40];
  std::strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%S", &tm);
  char out[48];
  std::snprintf(out, sizeof(out), "%s.%03lldZ", buf, static_cast<long long>(ms));
  return out;
}

spdlog::logger& Logger() {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  if (!s.logger) {
    s.logger = std::make_shared<spdlog::logger>("gemma2",
                                                std::make_shared<spdlog::sinks::stderr_sink_mt>());
    s.logger->set_pattern("%v");  // lines are composed here (time, level, program, fields)
    s.logger->set_level(spdlog::level::info);
    s.logger->flush_on(spdlog::level::trace);  // every line leaves at once (operators tail it)
  }
  return *s.logger;
}

void Emit(spdlog::level::level_enum level, const std::string& msg, const Fields& fields);

// Logging never throws into its caller (a request's bytes may be anything).
void SafeEmit(spdlog::level::level_enum level, const std::string& msg, const Fields& fields) {
  try {
    Emit(level, msg, fields);
  } catch (const std::exception&) {
  }
}

void Emit(spdlog::level::level_enum level, const std::string& msg, const Fields& fields) {
  spdlog::logger& logger = Logger();
  if (!logger.should_log(level)) return;
  State& s = state();
  std::string program;
  bool json;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    program = s.program;
    json = s.json;
  }
  const auto name = spdlog::level::to_string_view(level);
  const std::string level_name(name.data(), name.size());
  std::string line;
  if (json) {
    nlohmann::json j = {{"time", NowUtc()}, {"level", level_name}, {"program", program}, {"msg", msg}};
    for (const auto& [k, v] : fields) j[k] = v;
    line = j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  } else {
    line = NowUtc() + " " + level_name + " " + program + ": " + msg;
    for (const auto& [k, v] : fields) {
      const bool quote = v.empty() || v.find_first_of(" \"=") != std::string::npos;
      line += " " + k + "=" +
              (quote ? nlohmann::json(v).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace)
                     : v);
    }
  }
  logger.log(level, "{}", line);
}

}  // namespace

Status Init(const std::string& program, const std::string& level, const std::string& format) {
  const auto lvl = spdlog::level::from_str(level);
  if (lvl == spdlog::level::off && level != "off") {
    return InvalidArgument("--log-level " + level + ": trace, debug, info, warn, error or off");
  }
  if (format != "text" && format != "json")
    return InvalidArgument("--log-format " + format + ": text or json");
  Logger().set_level(lvl);
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  s.program = program;
  s.json = format == "json";
  return OkStatus();
}

void SetProgram(const std::string& program) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  s.program = program;
}

void Debug(const std::string& msg, const Fields& f) { SafeEmit(spdlog::level::debug, msg, f); }
void Info(const std::string& msg, const Fields& f) { SafeEmit(spdlog::level::info, msg, f); }
void Warn(const std::string& msg, const Fields& f) { SafeEmit(spdlog::level::warn, msg, f); }
void Error(const std::string& msg, const Fields& f) { SafeEmit(spdlog::level::err, msg, f); }

}  // namespace gemma2::log
