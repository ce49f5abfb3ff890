// The first failure among a step's ops. Backend ops return nothing (model/backend.h): a failed
// launch is kept here, with the op and the file:line it was launched from, until the step reports
// (BeginStep, ToHost, the ids to the host). Later failures are dropped: the first explains them.
#pragma once

#include <cuda_runtime.h>

#include "common/cuda_check.h"
#include "common/status.h"

namespace gemma2 {

class StickyStatus {
 public:
  // file and line default to the caller's (__builtin_FILE/LINE: GCC and clang alike, where
  // clang 14's std::source_location does not build).
  void Note(cudaError_t e, const char* what, const char* file = __builtin_FILE(),
            int line = __builtin_LINE()) {
    if (e != cudaSuccess && first_.ok()) first_ = cuda_detail::Check(e, what, file, line);
  }
  void Note(const Status& st) {
    if (!st.ok() && first_.ok()) first_ = st;
  }
  bool ok() const { return first_.ok(); }
  const Status& status() const { return first_; }

 private:
  Status first_;
};

}  // namespace gemma2
