// One check for CUDA runtime, cuBLAS(Lt) and NCCL calls. The message keeps the expression, the
// library's own error string, file:line, host, pid and device in every build type, and comes back
// as a Status (never an abort in library code).
#pragma once

#include <cuda_runtime.h>
#include <unistd.h>

#include <string>

#include "common/status.h"

namespace gemma2::cuda_detail {

inline std::string Where(const char* expr, const char* file, int line) {
  char host[256] = "?";
  ::gethostname(host, sizeof(host) - 1);
  int device = -1;
  cudaGetDevice(&device);
  return std::string(expr) + " at " + file + ":" + std::to_string(line) + " (host " + host +
         ", pid " + std::to_string(::getpid()) + ", device " + std::to_string(device) + ")";
}

inline Status Check(cudaError_t e, const char* expr, const char* file, int line) {
  if (e == cudaSuccess) return OkStatus();
  return Status(StatusCode::kInternal, std::string("CUDA error ") + cudaGetErrorName(e) + " (" +
                                           cudaGetErrorString(e) + ") in " +
                                           Where(expr, file, line));
}

}  // namespace gemma2::cuda_detail

// Defines a checker for another library's status type: GEMMA2_DEFINE_CHECK(cublasStatus_t,
// CUBLAS_STATUS_SUCCESS, cublasGetStatusString, "cuBLAS") next to that library's header.
// NOLINTBEGIN(bugprone-macro-parentheses): StatusType is a type, LibName a string literal.
#define GEMMA2_DEFINE_CHECK(StatusType, kSuccess, ToString, LibName)                             \
  namespace gemma2::cuda_detail {                                                                \
  inline Status Check(StatusType e, const char* expr, const char* file, int line) {              \
    if (e == kSuccess) return OkStatus();                                                        \
    return Status(StatusCode::kInternal, std::string(LibName " error ") + ToString(e) + " in " + \
                                             Where(expr, file, line));                           \
  }                                                                                              \
  }
// NOLINTEND(bugprone-macro-parentheses)

// RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(...)); works for any type with a Check overload.
#define RETURN_IF_CUDA_ERROR(expr) \
  RETURN_IF_ERROR(::gemma2::cuda_detail::Check((expr), #expr, __FILE__, __LINE__))
