// Matrix products through cuBLASLt: bf16 inputs, fp32 accumulation, bf16 or fp32 output. One
// plan (descriptors + algorithm) per layout, cached; one workspace serves every call.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <array>
#include <map>
#include <memory>

#include "common/status.h"

namespace gemma2::kernels {

// cuBLASLt's column-major view: C (m x n) = op(A) (m x k) · B (k x n), for `batch` matrices at
// fixed strides. A is stored k x m when trans_a, else m x k.
struct MatmulSpec {
  bool trans_a = true;
  int64_t m = 0, n = 0, k = 0;
  const void* a = nullptr;
  int64_t lda = 0, stride_a = 0;
  const void* b = nullptr;
  int64_t ldb = 0, stride_b = 0;
  void* c = nullptr;
  int64_t ldc = 0, stride_c = 0;
  bool c_f32 = false;
  int64_t batch = 1;
};

class Gemm {
 public:
  static Result<std::unique_ptr<Gemm>> Create(cudaStream_t stream);
  ~Gemm();
  Gemm(const Gemm&) = delete;
  Gemm& operator=(const Gemm&) = delete;

  // Projections: out[t][n] = sum_k x[t][k] * w[n][k] (x: [tokens, k], w: [n, k] as Hugging Face
  // stores weights, out: [tokens, n]). The algorithm is the fastest of the heuristic's candidates,
  // timed on the first call of each shape; with GEMMA2_GEMM_LOG=1 in the environment every timed
  // shape's candidates and pick are printed to stderr (to compare picks between runs).
  Status Run(const void* x, const void* w, void* out, bool out_f32, int64_t tokens, int64_t n,
             int64_t k);
  // Any layout; the heuristic's first algorithm (no timing: shapes vary with prompt length).
  Status Matmul(const MatmulSpec& s);

 private:
  struct Plan;
  using Key = std::array<int64_t, 12>;
  Gemm() = default;
  Result<Plan*> PlanFor(const MatmulSpec& s, bool autotune);
  Status Launch(const Plan& p, const MatmulSpec& s);

  cudaStream_t stream_ = nullptr;
  cublasLtHandle_t handle_ = nullptr;
  void* workspace_ = nullptr;
  size_t workspace_bytes_ = 0;
  std::map<Key, std::unique_ptr<Plan>> plans_;
};

}  // namespace gemma2::kernels
