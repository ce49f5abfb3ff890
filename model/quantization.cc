#include "model/quantization.h"

#include <cmath>

#include "common/dtype.h"

namespace gemma2 {

Result<Quantization> ParseQuantization(std::string_view name) {
  if (name == "none" || name.empty()) return Quantization::kNone;
  if (name == "fp8") return Quantization::kFp8;
  return InvalidArgument("--quantization: '" + std::string(name) + "' is not one of none, fp8");
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

}  // namespace gemma2
