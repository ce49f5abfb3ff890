#include "tests/reference_util.h"

#include "engine/engine.h"
#include "engine/generate.h"

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

std::map<std::string, std::string> ReferenceMetadata(const fs::path& case_dir) {
  auto f = SafetensorsFile::Open(case_dir / "reference.safetensors");
  return f.ok() ? (*f)->header().metadata : std::map<std::string, std::string>{};
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

static double TopTwoMargin(const float* row, int64_t n) {
  float a = -INFINITY, b = -INFINITY;
  for (int64_t i = 0; i < n; ++i) {
    if (row[i] > a) {
      b = a;
      a = row[i];
    } else if (row[i] > b) {
      b = row[i];
    }
  }
  return static_cast<double>(a) - b;
}

void CheckReferenceCase(const fs::path& dir, const EngineOptions& opts, double tol,
                        double token_margin, double* worst_out) {
  SCOPED_TRACE(dir.filename().string() + " " + opts.backend.name + " tp=" + std::to_string(opts.tp));
  const auto ref = LoadReference(dir);
  auto ck = Checkpoint::Open(dir);
  ASSERT_TRUE(ck.ok()) << ck.status().ToString();
  auto engine = Engine::Create(**ck, opts);
  ASSERT_TRUE(engine.ok()) << engine.status().ToString();
  const ModelConfig& c = (*engine)->config();
  ASSERT_EQ(ref.width, c.output_size());

  std::vector<std::vector<float>> rows;
  std::vector<int32_t> generated;
  if (c.is_classifier()) {
    auto res = Classify(**engine, ref.prompt_ids);
    ASSERT_TRUE(res.ok()) << res.status().ToString();
    rows = res->logits;
  } else {
    GenerationRequest req;
    req.prompt = ref.prompt_ids;
    req.max_new_tokens = static_cast<int64_t>(ref.generated_ids.size());
    req.ignore_eos = true;  // the reference generates a fixed count
    req.return_logits = true;
    auto res = Generate(**engine, {req});
    ASSERT_TRUE(res.ok()) << res.status().ToString();
    rows = (*res)[0].logits;
    generated = (*res)[0].generated;
  }
  // Large-vocabulary references keep only the rows from `first_row` on.
  const auto fr = ref.metadata.find("first_row");
  const int64_t first_row = fr == ref.metadata.end() ? 0 : std::stoll(fr->second);
  ASSERT_EQ(static_cast<int64_t>(rows.size()), first_row + ref.rows);
  int64_t comparable = ref.rows;
  const int64_t prompt = static_cast<int64_t>(ref.prompt_ids.size());
  for (size_t i = 0; i < generated.size(); ++i) {
    if (generated[i] == ref.generated_ids[i]) continue;
    const int64_t ref_row = prompt - 1 + static_cast<int64_t>(i) - first_row;
    const double margin = TopTwoMargin(ref.logits.data() + ref_row * ref.width, ref.width);
    EXPECT_LE(margin, token_margin) << "greedy token " << i << " differs; reference margin " << margin;
    comparable = ref_row + 1;  // this row chose differently; later rows see another context
    break;
  }
  double worst = 0;
  for (int64_t r = 0; r < comparable; ++r) {
    const double err =
        RelativeL2(rows[static_cast<size_t>(first_row + r)].data(), ref.logits.data() + r * ref.width, ref.width);
    worst = std::max(worst, err);
    EXPECT_LE(err, tol) << "row " << first_row + r;
  }
  std::cout << "[ reference ] " << dir.filename().string() << " " << opts.backend.name
            << " tp=" << opts.tp << ": " << comparable << " rows, worst relative L2 " << worst
            << "\n";
  if (worst_out) *worst_out = worst;
}

}  // namespace gemma2::testing
