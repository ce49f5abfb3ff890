#include "serving/step_trace.h"

#include <cerrno>
#include <cstring>
#include <memory>

namespace gemma2::serving {

Result<std::unique_ptr<StepTrace>> StepTrace::Open(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "w");
  if (!f) return InvalidArgument("--trace " + path + ": " + std::strerror(errno));
  std::fputs("[\n", f);
  return std::unique_ptr<StepTrace>(new StepTrace(f));
}

StepTrace::~StepTrace() {
  std::fputs("{}]\n", file_);
  std::fclose(file_);
}

void StepTrace::Span(const char* name, Clock::time_point begin, Clock::time_point end, int lane,
                     int64_t step, int64_t sequences, int64_t tokens, int64_t outputs) {
  const auto us = [&](Clock::time_point t) {
    return std::chrono::duration<double, std::micro>(t - origin_).count();
  };
  MutexLock lock(mu_);
  std::fprintf(file_,
               "{\"name\":\"%s\",\"ph\":\"X\",\"pid\":1,\"tid\":%d,\"ts\":%.1f,\"dur\":%.1f,"
               "\"args\":{\"step\":%lld,\"sequences\":%lld,\"tokens\":%lld,\"outputs\":%lld}},\n",
               name, lane, us(begin), us(end) - us(begin), static_cast<long long>(step),
               static_cast<long long>(sequences), static_cast<long long>(tokens),
               static_cast<long long>(outputs));
  std::fflush(file_);
}

}  // namespace gemma2::serving
