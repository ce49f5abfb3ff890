// The first failure among a step's ops. Backend ops return nothing (model/backend.h): a failed
// launch is kept here, with the op and the file:line it was launched from, until the step reports
// (BeginStep, ToHost, the ids to the host). Later failures are dropped: the first explains them.
#pragma once

#include <cuda_runtime.h>

#include <source_location>

#include "common/cuda_check.h"
#include "common/status.h"

namespace gemma2 {

class StickyStatus {
 public:
  void Note(cudaError_t e, const char* what,
            std::source_location where = std::source_location::current()) {
    if (e != cudaSuccess && first_.ok())
      first_ = cuda_detail::Check(e, what, where.file_name(), static_cast<int>(where.line()));
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
