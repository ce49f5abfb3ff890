#include "kernels/gemm.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "common/cuda_check.h"
#include "kernels/fp8.h"

namespace {
// cublasGetStatusString lives in libcublas, which nothing else here needs.
const char* CublasStatusName(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_NOT_INITIALIZED:
      return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED:
      return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE:
      return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH:
      return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR:
      return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED:
      return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR:
      return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED:
      return "CUBLAS_STATUS_NOT_SUPPORTED";
    default:
      return "CUBLAS_STATUS_UNKNOWN";
  }
}
}  // namespace

GEMMA2_DEFINE_CHECK(cublasStatus_t, CUBLAS_STATUS_SUCCESS, CublasStatusName, "cuBLAS")

namespace gemma2::kernels {

namespace {
// Owners of what planning creates: an early return frees them.
struct Preference {
  cublasLtMatmulPreference_t p = nullptr;
  ~Preference() {
    if (p) cublasLtMatmulPreferenceDestroy(p);
  }
};
struct Event {
  cudaEvent_t e = nullptr;
  ~Event() {
    if (e) cudaEventDestroy(e);
  }
};
}  // namespace

// Descriptors and the chosen algorithm for one (tokens, n, k, out dtype).
struct Gemm::Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo{};
  ~Plan() {
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (c) cublasLtMatrixLayoutDestroy(c);
    if (desc) cublasLtMatmulDescDestroy(desc);
  }
};

Result<std::unique_ptr<Gemm>> Gemm::Create(cudaStream_t stream) {
  std::unique_ptr<Gemm> g(new Gemm());
  g->stream_ = stream;
  RETURN_IF_CUDA_ERROR(cublasLtCreate(&g->handle_));
  g->workspace_bytes_ = size_t{64} << 20;
  RETURN_IF_CUDA_ERROR(cudaMalloc(&g->workspace_, g->workspace_bytes_));
  g->fp8_outer_vec_ = g->ProbeFp8OuterVec();
  if (const char* v = std::getenv("GEMMA2_GEMM_LOG"); v && *v && std::string(v) != "0") {
    std::fprintf(stderr, "gemm: FP8 outer-vector scaling %s\n",
                 g->fp8_outer_vec_ ? "supported" : "not supported: unscaled fp32 + a scaling kernel");
  }
  return g;
}

Gemm::~Gemm() {
  plans_.clear();
  if (workspace_) cudaFree(workspace_);
  if (handle_) cublasLtDestroy(handle_);
}

// Token counts that share one timing: up to 8 each its own, then each power of two with the counts
// below it down to the previous one (9..16 take 16's pick), so a serving step's new batch size or
// logits row count costs a plan, not a timing (~30 ms for the LM head's 8 candidates x 6 runs).
int64_t Gemm::TuningBucket(int64_t tokens) {
  if (tokens <= 8) return tokens;
  int64_t b = 16;
  while (b < tokens) b *= 2;
  return b;
}

Result<Gemm::Plan*> Gemm::PlanFor(const MatmulSpec& s, bool autotune) {
  const Key key = {s.trans_a, s.m,        s.n,        s.k,        s.lda,   s.ldb,
                   s.ldc,     s.stride_a, s.stride_b, s.stride_c, s.batch, s.c_f32, s.fp8,
                   s.outer_vec};
  if (auto it = plans_.find(key); it != plans_.end()) return it->second.get();
  auto p = std::make_unique<Plan>();
  RETURN_IF_CUDA_ERROR(cublasLtMatmulDescCreate(&p->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t ta = s.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, tb = CUBLAS_OP_N;
  RETURN_IF_CUDA_ERROR(
      cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
  RETURN_IF_CUDA_ERROR(
      cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
  const cudaDataType_t in_type = s.fp8 ? CUDA_R_8F_E4M3 : CUDA_R_16BF;
  if (s.fp8 && s.outer_vec) {  // the modes, and pointers before the heuristic looks at them
    const cublasLtMatmulMatrixScale_t mode = CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F;
    RETURN_IF_CUDA_ERROR(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE,
                                                        &mode, sizeof(mode)));
    RETURN_IF_CUDA_ERROR(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE,
                                                        &mode, sizeof(mode)));
    RETURN_IF_CUDA_ERROR(cublasLtMatmulDescSetAttribute(
        p->desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &s.a_scale, sizeof(s.a_scale)));
    RETURN_IF_CUDA_ERROR(cublasLtMatmulDescSetAttribute(
        p->desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &s.b_scale, sizeof(s.b_scale)));
  }
  RETURN_IF_CUDA_ERROR(cublasLtMatrixLayoutCreate(&p->a, in_type, s.trans_a ? s.k : s.m,
                                                  s.trans_a ? s.m : s.k, s.lda));
  RETURN_IF_CUDA_ERROR(cublasLtMatrixLayoutCreate(&p->b, in_type, s.k, s.n, s.ldb));
  RETURN_IF_CUDA_ERROR(
      cublasLtMatrixLayoutCreate(&p->c, s.c_f32 ? CUDA_R_32F : CUDA_R_16BF, s.m, s.n, s.ldc));
  if (s.batch > 1) {
    const int32_t count = static_cast<int32_t>(s.batch);
    const std::pair<cublasLtMatrixLayout_t, int64_t> layouts[] = {
        {p->a, s.stride_a}, {p->b, s.stride_b}, {p->c, s.stride_c}};
    for (const auto& [layout, stride] : layouts) {
      RETURN_IF_CUDA_ERROR(cublasLtMatrixLayoutSetAttribute(
          layout, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof(count)));
      RETURN_IF_CUDA_ERROR(cublasLtMatrixLayoutSetAttribute(
          layout, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride, sizeof(stride)));
    }
  }
  // A shape of an already timed bucket (below) takes the bucket's pick when it runs this shape.
  // Only projections are timed; their token count is n in cuBLASLt's view (ProjectionSpec).
  Key bucket = key;
  bucket[2] = TuningBucket(s.n);
  if (autotune) {
    if (auto t = tuned_.find(bucket); t != tuned_.end()) {
      cublasLtMatmulHeuristicResult_t check = {};
      if (cublasLtMatmulAlgoCheck(handle_, p->desc, p->a, p->b, p->c, p->c, &t->second, &check) ==
              CUBLAS_STATUS_SUCCESS &&
          check.workspaceSize <= workspace_bytes_) {
        p->algo = t->second;
        Plan* raw = p.get();
        plans_.emplace(key, std::move(p));
        return raw;
      }
      autotune = false;  // the heuristic's first choice, untimed
    }
  }
  Preference pref;
  RETURN_IF_CUDA_ERROR(cublasLtMatmulPreferenceCreate(&pref.p));
  RETURN_IF_CUDA_ERROR(cublasLtMatmulPreferenceSetAttribute(
      pref.p, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace_bytes_, sizeof(workspace_bytes_)));
  constexpr int kCandidates = 8;
  cublasLtMatmulHeuristicResult_t results[kCandidates] = {};
  int found = 0;
  const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(
      handle_, p->desc, p->a, p->b, p->c, p->c, pref.p, autotune ? kCandidates : 1, results, &found);
  if (st != CUBLAS_STATUS_SUCCESS || found == 0) {
    return Internal("cuBLASLt has no algorithm for m=" + std::to_string(s.m) +
                    " n=" + std::to_string(s.n) + " k=" + std::to_string(s.k) +
                    " batch=" + std::to_string(s.batch));
  }
  // The heuristic's first choice is often not the fastest for skinny shapes: time each candidate
  // on the real operands once (beta = 0, so repeated runs leave the same output). Each timed run
  // starts with the weights out of L2 (the workspace, larger than L2, is overwritten first), as
  // they are when a decode step streams every layer's weights.
  p->algo = results[0].algo;
  if (found > 1) {
    Event start, stop;
    RETURN_IF_CUDA_ERROR(cudaEventCreate(&start.e));
    RETURN_IF_CUDA_ERROR(cudaEventCreate(&stop.e));
    float best = 1e30f;
    int best_index = 0;
    std::string timings;  // for GEMMA2_GEMM_LOG
    cublasLtMatmulAlgo_t best_algo = results[0].algo;
    for (int i = 0; i < found; ++i) {
      p->algo = results[i].algo;
      float ms = 1e30f;  // the fastest of five runs after a warm-up: candidates a few percent
      bool ok = true;    // apart are told apart reproducibly
      for (int rep = 0; rep < 6 && ok; ++rep) {
        RETURN_IF_CUDA_ERROR(cudaMemsetAsync(workspace_, 0, workspace_bytes_, stream_));
        RETURN_IF_CUDA_ERROR(cudaEventRecord(start.e, stream_));
        ok = Launch(*p, s).ok();
        RETURN_IF_CUDA_ERROR(cudaEventRecord(stop.e, stream_));
        RETURN_IF_CUDA_ERROR(cudaEventSynchronize(stop.e));
        float t = 0;
        RETURN_IF_CUDA_ERROR(cudaEventElapsedTime(&t, start.e, stop.e));
        if (rep > 0) ms = std::min(ms, t);
      }
      char one[32];
      std::snprintf(one, sizeof(one), ok ? "%s%.1f" : "%sx", i ? " " : "", ms * 1e3f);
      timings += one;
      if (ok && ms < best) {
        best = ms;
        best_index = i;
        best_algo = results[i].algo;
      }
    }
    static const bool log = [] {
      const char* v = std::getenv("GEMMA2_GEMM_LOG");
      return v && *v && std::string(v) != "0";
    }();
    if (log) {
      std::fprintf(stderr, "gemm autotune m=%ld n=%ld k=%ld: candidates [%s] us, picked #%d\n",
                   static_cast<long>(s.m), static_cast<long>(s.n), static_cast<long>(s.k),
                   timings.c_str(), best_index);
    }
    p->algo = best_algo;
    cudaGetLastError();  // a candidate that failed to launch is not an error of the caller
  }
  if (autotune) tuned_[bucket] = p->algo;
  Plan* raw = p.get();
  plans_.emplace(key, std::move(p));
  return raw;
}

Status Gemm::Launch(const Plan& p, const MatmulSpec& s) {
  const float alpha = 1.0f, beta = 0.0f;
  if (s.fp8 && s.outer_vec) {  // the scale vectors change from call to call; the plan is per shape
    RETURN_IF_CUDA_ERROR(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER,
                                                        &s.a_scale, sizeof(s.a_scale)));
    RETURN_IF_CUDA_ERROR(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER,
                                                        &s.b_scale, sizeof(s.b_scale)));
  }
  RETURN_IF_CUDA_ERROR(cublasLtMatmul(handle_, p.desc, &alpha, s.a, p.a, s.b, p.b, &beta, s.c, p.c,
                                      s.c, p.c, &p.algo, workspace_, workspace_bytes_, stream_));
  return OkStatus();
}

namespace {
// Projections in cuBLASLt's column-major view: w is k x n (ld k), x is k x tokens (ld k), out is
// n x tokens (ld n).
MatmulSpec ProjectionSpec(const void* x, const void* w, void* out, bool out_f32, int64_t tokens,
                          int64_t n, int64_t k) {
  MatmulSpec s;
  s.trans_a = true;
  s.m = n;
  s.n = tokens;
  s.k = k;
  s.a = w;
  s.lda = k;
  s.b = x;
  s.ldb = k;
  s.c = out;
  s.ldc = n;
  s.c_f32 = out_f32;
  return s;
}
}  // namespace

Status Gemm::Run(const void* x, const void* w, void* out, bool out_f32, int64_t tokens, int64_t n,
                 int64_t k) {
  if (tokens == 0 || n == 0) return OkStatus();
  MatmulSpec s = ProjectionSpec(x, w, out, out_f32, tokens, n, k);
  // Timing candidates costs ~24 launches and a sync per new shape. Skinny shapes (few tokens, where
  // the heuristic's first choice is often slow) and power-of-two token counts are timed; a serving
  // step's arbitrary token counts take the heuristic's choice instead of stalling on a new shape.
  const bool autotune = tokens <= 64 || (tokens & (tokens - 1)) == 0;
  ASSIGN_OR_RETURN(Plan * p, PlanFor(s, autotune));
  return Launch(*p, s);
}

// A heuristic query for a small outer-vector-scaled FP8 product (operands and scale vectors point
// into the workspace: only their alignment matters here).
bool Gemm::ProbeFp8OuterVec() {
  MatmulSpec s;
  s.m = s.n = s.k = 64;
  s.a = s.b = s.c = workspace_;
  s.lda = s.ldb = s.ldc = 64;
  s.fp8 = true;
  s.a_scale = s.b_scale = static_cast<const float*>(workspace_);
  const bool ok = PlanFor(s, /*autotune=*/false).ok();
  plans_.clear();
  return ok;
}

Status Gemm::RunFp8(const void* x, const float* x_scale, const void* w, const float* w_scale,
                    void* out, bool out_f32, int64_t tokens, int64_t n, int64_t k,
                    float* f32_tmp) {
  if (tokens == 0 || n == 0) return OkStatus();
  if (k % 16 != 0) return InvalidArgument("FP8 GEMM: k = " + std::to_string(k) + " is not a multiple of 16");
  MatmulSpec s = ProjectionSpec(x, w, out, out_f32, tokens, n, k);  // one byte per element
  s.fp8 = true;
  s.a_scale = w_scale;
  s.b_scale = x_scale;
  s.outer_vec = fp8_outer_vec_;
  if (!s.outer_vec) {  // unscaled into fp32, then both scales
    if (!f32_tmp) return InvalidArgument("FP8 GEMM without outer-vector scaling needs f32_tmp");
    s.c = f32_tmp;
    s.c_f32 = true;
  }
  const bool autotune = tokens <= 64 || (tokens & (tokens - 1)) == 0;
  ASSIGN_OR_RETURN(Plan * p, PlanFor(s, autotune));
  RETURN_IF_ERROR(Launch(*p, s));
  if (s.outer_vec) return OkStatus();
  RETURN_IF_CUDA_ERROR(
      ScaleRowsAndColumns(f32_tmp, x_scale, w_scale, out, out_f32, tokens, n, stream_));
  return OkStatus();
}

Status Gemm::Matmul(const MatmulSpec& s) {
  if (s.m == 0 || s.n == 0 || s.batch == 0) return OkStatus();
  ASSIGN_OR_RETURN(Plan * p, PlanFor(s, /*autotune=*/false));
  return Launch(*p, s);
}

}  // namespace gemma2::kernels
