// Runs the worker's steps on a thread of their own, in the order they arrive, so the control
// thread stays free to answer heartbeats while a step computes: a rank whose process stopped is
// then told apart from one whose step is merely long, and the coordinator names the right rank.
//
// Threading: Push, TakeDone, busy and ready_fd belong to the control thread; `run` runs on the
// step thread only (it never touches the control channel).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <optional>
#include <thread>
#include <vector>

#include "common/mutex.h"
#include "common/status.h"

namespace gemma2 {

class StepThread {
 public:
  // Takes a step's payload, returns the encoded answer (or why it failed).
  using Run = std::function<Result<std::vector<uint8_t>>(const std::vector<uint8_t>& step)>;
  explicit StepThread(Run run);
  // Joins once the step thread is idle. The owner must not destroy what `run` uses while a step
  // is in progress (busy()): the worker exits the process instead.
  ~StepThread();
  StepThread(const StepThread&) = delete;
  StepThread& operator=(const StepThread&) = delete;

  void Push(std::vector<uint8_t> step) EXCLUDES(mu_);
  // The oldest finished answer, if any.
  std::optional<Result<std::vector<uint8_t>>> TakeDone() EXCLUDES(mu_);
  // Steps pushed and not yet taken back.
  bool busy() const EXCLUDES(mu_);
  // Readable while a finished answer waits (an eventfd, for the control thread's poll).
  int ready_fd() const { return event_fd_; }

 private:
  void Loop() EXCLUDES(mu_);

  Run run_;
  int event_fd_ = -1;
  // Shared by the control thread (Push, TakeDone, busy) and the step thread (Loop).
  mutable Mutex mu_;
  std::condition_variable_any cv_;  // todo_ or stop_ changed
  std::deque<std::vector<uint8_t>> todo_ GUARDED_BY(mu_);
  std::deque<Result<std::vector<uint8_t>>> done_ GUARDED_BY(mu_);
  size_t outstanding_ GUARDED_BY(mu_) = 0;  // pushed, not yet taken
  bool stop_ GUARDED_BY(mu_) = false;
  std::thread thread_;
};

}  // namespace gemma2
