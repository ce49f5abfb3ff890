#include "model/quantization.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "common/dtype.h"
#include "common/json_depth.h"
#include "model/fp8_checkpoint.h"

namespace gemma2 {

Result<Quantization> ParseQuantization(std::string_view name) {
  if (name == "none" || name.empty()) return Quantization::kNone;
  if (name == "fp8") return Quantization::kFp8;
  return InvalidArgument("--quantization: '" + std::string(name) + "' is not one of none, fp8");
}

Result<Quantization> ResolveQuantization(std::string_view flag, const std::string& model) {
  if (flag != "auto") return ParseQuantization(flag);
  const std::filesystem::path config = std::filesystem::path(model) / "config.json";
  std::error_code ec;
  if (model.rfind("random:", 0) == 0 || !std::filesystem::is_regular_file(config, ec))
    return Quantization::kNone;
  std::ifstream in(config, std::ios::binary);
  std::stringstream text;
  text << in.rdbuf();
  const std::string body = text.str();
  if (!JsonNestingWithin(body, kMaxPeerJsonDepth)) return Quantization::kNone;  // as below
  const nlohmann::json j = nlohmann::json::parse(body, nullptr, false);
  if (j.is_discarded()) return Quantization::kNone;  // the loader reports a broken config
  ASSIGN_OR_RETURN(const Fp8Scheme scheme, Fp8SchemeFromConfig(j, config.string()));
  return scheme.kind == Fp8Scheme::Kind::kNone ? Quantization::kNone : Quantization::kFp8;
}

std::string_view QuantizationName(Quantization q) {
  return q == Quantization::kFp8 ? "fp8" : "none";
}

float RowScaleFp8(float amax) { return amax > 0 && std::isfinite(amax) ? amax / kF8E4M3Max : 1.0f; }

void QuantizeRowsFp8(const float* w, int64_t rows, int64_t cols, uint8_t* q, float* scale) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = w + r * cols;
    float amax = 0;
    for (int64_t k = 0; k < cols; ++k) amax = std::fmax(amax, std::fabs(row[k]));
    const float s = RowScaleFp8(amax);
    scale[r] = s;
    for (int64_t k = 0; k < cols; ++k) q[r * cols + k] = F32ToF8E4M3(row[k] / s);
  }
}

Result<KvCacheDtype> ParseKvCacheDtype(std::string_view name) {
  if (name == "auto" || name.empty()) return KvCacheDtype::kAuto;
  if (name == "fp8" || name == "fp8_e4m3") return KvCacheDtype::kFp8;
  return InvalidArgument("--kv-cache-dtype: '" + std::string(name) +
                         "' is not one of auto, fp8, fp8_e4m3 (E4M3 with a scale per position and "
                         "kv head; fp8_e5m2 is not built)");
}

std::string_view KvCacheDtypeName(KvCacheDtype d) {
  return d == KvCacheDtype::kFp8 ? "fp8" : "auto";
}

void RoundRowsThroughFp8(float* x, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = x + r * cols;
    float amax = 0;
    for (int64_t k = 0; k < cols; ++k) amax = std::fmax(amax, std::fabs(row[k]));
    const float s = RowScaleFp8(amax);
    for (int64_t k = 0; k < cols; ++k) row[k] = F8E4M3ToF32(F32ToF8E4M3(row[k] / s)) * s;
  }
}

}  // namespace gemma2
