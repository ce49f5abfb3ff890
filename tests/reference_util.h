// Helpers shared by tests: comparing logits rows and reading reference files.
#pragma once

#include <cmath>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "model/safetensors.h"

namespace gemma2::testing {

// ||a - b|| / ||b||, in double.
inline double RelativeL2(const float* a, const float* b, int64_t n) {
  double num = 0, den = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double d = static_cast<double>(a[i]) - b[i];
    num += d * d;
    den += static_cast<double>(b[i]) * b[i];
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

// One Hugging Face reference (tools/make_references.py): ids as int64, logits as [rows, width].
struct Reference {
  std::string name;
  std::vector<int32_t> prompt_ids, generated_ids;
  int64_t rows = 0, width = 0;
  std::vector<float> logits;
  std::map<std::string, std::string> metadata;
};

Reference LoadReference(const std::filesystem::path& case_dir);  // aborts the test on failure
// Only the reference file's metadata (its header; empty when the file does not open).
std::map<std::string, std::string> ReferenceMetadata(const std::filesystem::path& case_dir);

// Case directories under tests/data/references plus those under $GEMMA2_REFERENCE_DIRS
// (':'-separated).
std::vector<std::filesystem::path> ReferenceCaseDirs();

}  // namespace gemma2::testing

namespace gemma2 {
struct EngineOptions;
namespace testing {

// Runs the engine with `opts` on one reference case and compares every logits row (relative L2
// <= tol). Greedy tokens must be identical wherever the reference's top-2 margin exceeds
// `token_margin` (0: always); rows after an allowed divergence are not compared. The worst row's
// relative L2 goes to *worst when given (left alone when the case could not run).
void CheckReferenceCase(const std::filesystem::path& dir, const EngineOptions& opts, double tol,
                        double token_margin, double* worst_out = nullptr);

}  // namespace testing
}  // namespace gemma2
