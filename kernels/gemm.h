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
  // A and B in FP8 E4M3 with fp32 scale vectors (cuBLASLt's outer-vector scaling): C[i][j] =
  // a_scale[i] * b_scale[j] * sum_k op(A)[i][k] B[k][j]. Hopper wants op(A) transposed.
  bool fp8 = false;
  bool outer_vec = true;           // false: unscaled (cuBLASLt's default scalar scales of 1)
  const float* a_scale = nullptr;  // m values
  const float* b_scale = nullptr;  // n values
};

class Gemm {
 public:
  static Result<std::unique_ptr<Gemm>> Create(cudaStream_t stream);
  ~Gemm();
  Gemm(const Gemm&) = delete;
  Gemm& operator=(const Gemm&) = delete;

  // Projections: out[t][n] = sum_k x[t][k] * w[n][k] (x: [tokens, k], w: [n, k] as Hugging Face
  // stores weights, out: [tokens, n]). The algorithm is the fastest of the heuristic's candidates,
  // timed on the first call of each shape's bucket (up to 64 tokens: counts up to 8, then 16, 32,
  // 64 for the counts below each; powers of two past it; other counts take the heuristic's first
  // choice untimed); with GEMMA2_GEMM_LOG=1 in the environment every timed shape's candidates and
  // pick are printed to stderr (to compare picks between runs).
  Status Run(const void* x, const void* w, void* out, bool out_f32, int64_t tokens, int64_t n,
             int64_t k);
  // Run's product on FP8 operands: out[t][n] = x_scale[t] * w_scale[n] * sum_k x[t][k] * w[n][k]
  // (x, w: E4M3; k a multiple of 16). Where cuBLASLt has no outer-vector scaling (see
  // fp8_outer_vec()), the product goes unscaled into `f32_tmp` ([tokens, n] fp32, the caller's
  // scratch) and a second kernel applies both scales.
  Status RunFp8(const void* x, const float* x_scale, const void* w, const float* w_scale, void* out,
                bool out_f32, int64_t tokens, int64_t n, int64_t k, float* f32_tmp);
  // Whether this cuBLASLt scales FP8 products by row and column vectors (CUDA >= 12.9, sm_90),
  // probed once at Create.
  bool fp8_outer_vec() const { return fp8_outer_vec_; }
  // Any layout; the heuristic's first algorithm (no timing: shapes vary with prompt length).
  Status Matmul(const MatmulSpec& s);

 private:
  struct Plan;
  using Key = std::array<int64_t, 14>;
  Gemm() = default;
  Result<Plan*> PlanFor(const MatmulSpec& s, bool autotune);
  static int64_t TuningBucket(int64_t tokens);
  Status Launch(const Plan& p, const MatmulSpec& s);

  bool ProbeFp8OuterVec();
  bool fp8_outer_vec_ = false;
  cudaStream_t stream_ = nullptr;
  cublasLtHandle_t handle_ = nullptr;
  void* workspace_ = nullptr;
  size_t workspace_bytes_ = 0;
  std::map<Key, std::unique_ptr<Plan>> plans_;
  // Timed picks by shape with the token count replaced by its TuningBucket.
  std::map<Key, cublasLtMatmulAlgo_t> tuned_;
};

}  // namespace gemma2::kernels
