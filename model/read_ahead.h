// Read-ahead for checkpoint loading: background threads pull file ranges into the page cache in
// the order they were asked for, so the loader, copying the same bytes moments later out of an
// mmap, finds them there and the disk stays busy while the loader copies and uploads.
// A hint only: a range that cannot be read is skipped; the loader's own read reports the error.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace gemma2 {

class ReadAhead {
 public:
  // `threads` reads of `chunk_bytes` each are in flight at most.
  explicit ReadAhead(int threads = 4, int64_t chunk_bytes = int64_t{8} << 20);
  ~ReadAhead();  // drops what is still queued; waits for the reads in flight
  ReadAhead(const ReadAhead&) = delete;
  ReadAhead& operator=(const ReadAhead&) = delete;

  // Queues bytes [offset, offset + length) of `path`; the threads start on the first call.
  void Add(const std::string& path, int64_t offset, int64_t length);
  // Blocks until everything queued so far has been read (or skipped).
  void WaitIdle();
  int64_t bytes_read() const;

 private:
  struct Chunk {
    int fd;
    int64_t offset, length;
  };
  void Work();

  const int threads_;
  const int64_t chunk_bytes_;
  mutable std::mutex mu_;
  std::condition_variable wake_, idle_;
  std::deque<Chunk> queue_;
  std::map<std::string, int> fds_;  // -1: could not be opened
  std::vector<std::thread> workers_;
  int busy_ = 0;
  bool stop_ = false;
  int64_t bytes_read_ = 0;
};

}  // namespace gemma2
