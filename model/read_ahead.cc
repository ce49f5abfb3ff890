#include "model/read_ahead.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <memory>

namespace gemma2 {

ReadAhead::ReadAhead(int threads, int64_t chunk_bytes)
    : threads_(std::max(1, threads)), chunk_bytes_(std::max<int64_t>(4096, chunk_bytes)) {}

ReadAhead::~ReadAhead() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
    queue_.clear();
  }
  wake_.notify_all();
  for (auto& t : workers_) t.join();
  for (const auto& [path, fd] : fds_) {
    if (fd >= 0) ::close(fd);
  }
}

void ReadAhead::Add(const std::string& path, int64_t offset, int64_t length) {
  if (length <= 0 || offset < 0) return;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = fds_.find(path);
    if (it == fds_.end()) it = fds_.emplace(path, ::open(path.c_str(), O_RDONLY | O_CLOEXEC)).first;
    if (it->second < 0) return;
    for (int64_t at = offset; at < offset + length; at += chunk_bytes_) {
      queue_.push_back({it->second, at, std::min(chunk_bytes_, offset + length - at)});
    }
    while (static_cast<int>(workers_.size()) < threads_) workers_.emplace_back([this] { Work(); });
  }
  wake_.notify_all();
}

void ReadAhead::WaitIdle() {
  std::unique_lock<std::mutex> lock(mu_);
  idle_.wait(lock, [&] { return queue_.empty() && busy_ == 0; });
}

int64_t ReadAhead::bytes_read() const {
  std::lock_guard<std::mutex> lock(mu_);
  return bytes_read_;
}

void ReadAhead::Work() {
  std::unique_ptr<char[]> buffer(new char[static_cast<size_t>(chunk_bytes_)]);
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    wake_.wait(lock, [&] { return stop_ || !queue_.empty(); });
    if (stop_) return;
    const Chunk c = queue_.front();
    queue_.pop_front();
    ++busy_;
    lock.unlock();
    int64_t done = 0;
    while (done < c.length) {
      const ssize_t n = ::pread(c.fd, buffer.get(), static_cast<size_t>(c.length - done),
                                static_cast<off_t>(c.offset + done));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) break;  // a hint: the loader's own read reports what went wrong
      done += n;
    }
    lock.lock();
    --busy_;
    bytes_read_ += done;
    if (queue_.empty() && busy_ == 0) idle_.notify_all();
  }
}

}  // namespace gemma2
