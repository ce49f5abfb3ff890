#include "worker/step_thread.h"

#include <sys/eventfd.h>
#include <unistd.h>

namespace gemma2 {

StepThread::StepThread(Run run)
    : run_(std::move(run)), event_fd_(eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) {
  thread_ = std::thread([this] { Loop(); });
}

StepThread::~StepThread() {
  {
    MutexLock lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
  if (event_fd_ >= 0) close(event_fd_);
}

void StepThread::Push(std::vector<uint8_t> step) {
  {
    MutexLock lock(mu_);
    todo_.push_back(std::move(step));
    ++outstanding_;
  }
  cv_.notify_all();
}

std::optional<Result<std::vector<uint8_t>>> StepThread::TakeDone() {
  MutexLock lock(mu_);
  if (done_.empty()) {
    uint64_t n;
    (void)!read(event_fd_, &n, sizeof(n));  // drained: not readable until the next answer
    return std::nullopt;
  }
  Result<std::vector<uint8_t>> r = std::move(done_.front());
  done_.pop_front();
  --outstanding_;
  return r;
}

bool StepThread::busy() const {
  MutexLock lock(mu_);
  return outstanding_ > 0;
}

void StepThread::Loop() {
  while (true) {
    std::vector<uint8_t> step;
    {
      MutexLock lock(mu_);
      while (!stop_ && todo_.empty()) cv_.wait(mu_);
      if (stop_) return;
      step = std::move(todo_.front());
      todo_.pop_front();
    }
    Result<std::vector<uint8_t>> answer = run_(step);
    {
      MutexLock lock(mu_);
      done_.push_back(std::move(answer));
    }
    const uint64_t one = 1;
    (void)!write(event_fd_, &one, sizeof(one));
  }
}

}  // namespace gemma2
