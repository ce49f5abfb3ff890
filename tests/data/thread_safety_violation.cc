// Must NOT compile under the thread-safety check (tests/CMakeLists.txt: thread_safety_catches):
// a guarded member read without its mutex. Proves the check's flags and common/mutex.h's
// annotations are live, so a clean check means something.
#include "common/mutex.h"

namespace gemma2 {

class Counter {
 public:
  void Add() {
    MutexLock lock(mu_);
    ++n_;
  }
  int Peek() const { return n_; }  // the planted error: no lock held

 private:
  mutable Mutex mu_;
  int n_ GUARDED_BY(mu_) = 0;
};

int Use() {
  Counter c;
  c.Add();
  return c.Peek();
}

}  // namespace gemma2
