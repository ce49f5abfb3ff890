// A per-step timeline of the scheduler (gemma2-launch --trace FILE) in the Chrome trace format
// (chrome://tracing, Perfetto): for every step, the host building its plan ("schedule"), handing
// it to the executor ("submit": encoding and sending it to the ranks), the time until its
// answer is back ("step": the ranks' work and the control plane; "ranks": the slowest rank's own
// time in the step, as the cluster reports it, ending with "step" — it may start during
// "submit", once the first rank has its plan), and the host applying it
// ("apply"), with the step's sequences, tokens and output rows. Events are written as they end
// (a JSON array left open, which both viewers accept), so a trace of a server that is killed
// still reads.
#pragma once

#include <chrono>
#include <cstdio>
#include <memory>
#include <string>

#include "common/mutex.h"
#include "common/status.h"

namespace gemma2::serving {

class StepTrace {
 public:
  static Result<std::unique_ptr<StepTrace>> Open(const std::string& path);
  ~StepTrace();
  using Clock = std::chrono::steady_clock;
  // One complete event on track `lane` (0: the scheduler thread; k > 0: step slots in flight).
  void Span(const char* name, Clock::time_point begin, Clock::time_point end, int lane,
            int64_t step, int64_t sequences, int64_t tokens, int64_t outputs);

 private:
  explicit StepTrace(std::FILE* f) : file_(f), origin_(Clock::now()) {}
  Mutex mu_;
  std::FILE* file_ PT_GUARDED_BY(mu_);
  Clock::time_point origin_;
};

}  // namespace gemma2::serving
