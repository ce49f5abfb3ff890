// Projections through cuBLASLt: bf16 inputs, fp32 accumulation, bf16 or fp32 output. The
// algorithm is chosen once per shape (the fastest of the heuristic's candidates, timed) and
// cached; one workspace serves every call.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <map>
#include <memory>
#include <tuple>

#include "common/status.h"

namespace gemma2::kernels {

class Gemm {
 public:
  static Result<std::unique_ptr<Gemm>> Create(cudaStream_t stream);
  ~Gemm();
  Gemm(const Gemm&) = delete;
  Gemm& operator=(const Gemm&) = delete;

  // out[t][n] = sum_k x[t][k] * w[n][k]  (x: [tokens, k] bf16, w: [n, k] bf16 as Hugging Face
  // stores weights, out: [tokens, n] bf16 or fp32).
  Status Run(const void* x, const void* w, void* out, bool out_f32, int64_t tokens, int64_t n,
             int64_t k);

 private:
  struct Plan;
  Gemm() = default;
  // The cached plan for a shape; the first call times the heuristic's candidates on these operands.
  Result<Plan*> PlanFor(const void* x, const void* w, void* out, int64_t tokens, int64_t n,
                        int64_t k, bool out_f32);

  cudaStream_t stream_ = nullptr;
  cublasLtHandle_t handle_ = nullptr;
  void* workspace_ = nullptr;
  size_t workspace_bytes_ = 0;
  std::map<std::tuple<int64_t, int64_t, int64_t, bool>, std::unique_ptr<Plan>> plans_;
};

}  // namespace gemma2::kernels
