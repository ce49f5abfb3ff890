// A mutex Clang's thread-safety analysis understands (-Wthread-safety: the clang check that
// `make test` runs, tests/CMakeLists.txt). Members name the mutex that guards them (GUARDED_BY),
// functions what they need held or not held (REQUIRES, EXCLUDES); GCC builds see plain code.
// Condition variables: std::condition_variable_any over the Mutex itself, waited on in a loop
// written in the function that holds the lock (a predicate lambda is analysed apart from it).
#pragma once

#include <mutex>

#if defined(__clang__)
#define GEMMA2_TSA(x) __attribute__((x))
#else
#define GEMMA2_TSA(x)
#endif

#define CAPABILITY(x) GEMMA2_TSA(capability(x))
#define SCOPED_CAPABILITY GEMMA2_TSA(scoped_lockable)
#define GUARDED_BY(x) GEMMA2_TSA(guarded_by(x))
#define PT_GUARDED_BY(x) GEMMA2_TSA(pt_guarded_by(x))
#define REQUIRES(...) GEMMA2_TSA(requires_capability(__VA_ARGS__))
#define EXCLUDES(...) GEMMA2_TSA(locks_excluded(__VA_ARGS__))
#define ACQUIRE(...) GEMMA2_TSA(acquire_capability(__VA_ARGS__))
#define RELEASE(...) GEMMA2_TSA(release_capability(__VA_ARGS__))
#define TRY_ACQUIRE(...) GEMMA2_TSA(try_acquire_capability(__VA_ARGS__))
#define NO_THREAD_SAFETY_ANALYSIS GEMMA2_TSA(no_thread_safety_analysis)

namespace gemma2 {

class CAPABILITY("mutex") Mutex {
 public:
  void lock() ACQUIRE() { mu_.lock(); }
  void unlock() RELEASE() { mu_.unlock(); }
  bool try_lock() TRY_ACQUIRE(true) { return mu_.try_lock(); }

 private:
  std::mutex mu_;
};

// Holds a Mutex for its scope.
class SCOPED_CAPABILITY MutexLock {
 public:
  explicit MutexLock(Mutex& mu) ACQUIRE(mu) : mu_(mu) { mu_.lock(); }
  ~MutexLock() RELEASE() { mu_.unlock(); }
  MutexLock(const MutexLock&) = delete;
  MutexLock& operator=(const MutexLock&) = delete;

 private:
  Mutex& mu_;
};

}  // namespace gemma2
