#include "tests/reference_util.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <sstream>

namespace gemma2::testing {
namespace fs = std::filesystem;

static std::vector<int32_t> ReadIds(const SafetensorsFile& f, const std::string& name) {
  const auto& t = f.header().tensors.at(name);
  EXPECT_EQ(t.dtype, DType::kI64) << name;
  std::vector<int32_t> out;
  const auto* p = f.TensorData(t);
  for (int64_t i = 0; i < t.num_elements(); ++i) {
    int64_t v;
    std::memcpy(&v, p + 8 * i, 8);
    out.push_back(static_cast<int32_t>(v));
  }
  return out;
}

Reference LoadReference(const fs::path& case_dir) {
  Reference r;
  r.name = case_dir.filename().string();
  auto f = SafetensorsFile::Open(case_dir / "reference.safetensors");
  if (!f.ok()) {
    ADD_FAILURE() << f.status().ToString();
    return r;
  }
  r.prompt_ids = ReadIds(**f, "prompt_ids");
  r.generated_ids = ReadIds(**f, "generated_ids");
  const auto& t = (*f)->header().tensors.at("logits");
  EXPECT_EQ(t.dtype, DType::kF32);
  r.rows = t.shape.size() == 2 ? t.shape[0] : 1;
  r.width = t.shape.back();
  r.logits.resize(static_cast<size_t>(r.rows * r.width));
  std::memcpy(r.logits.data(), (*f)->TensorData(t), r.logits.size() * 4);
  r.metadata = (*f)->header().metadata;
  return r;
}

std::vector<fs::path> ReferenceCaseDirs() {
  std::vector<fs::path> roots = {fs::path(GEMMA2_SOURCE_DIR) / "tests/data/references"};
  if (const char* extra = std::getenv("GEMMA2_REFERENCE_DIRS")) {
    std::stringstream ss(extra);
    for (std::string item; std::getline(ss, item, ':');) {
      if (!item.empty()) roots.emplace_back(item);
    }
  }
  std::vector<fs::path> out;
  for (const auto& root : roots) {
    std::error_code ec;
    for (const auto& e : fs::directory_iterator(root, ec)) {
      if (fs::exists(e.path() / "reference.safetensors")) out.push_back(e.path());
    }
  }
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace gemma2::testing
