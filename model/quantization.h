// Weight quantization of the projections (q|k|v, o, gate|up, down): what --quantization names, and
// the reference of the FP8 scheme every backend follows. The embedding, the tied LM head, the
// norms and the classifier heads keep the checkpoint's precision.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "common/status.h"

namespace gemma2 {

enum class Quantization : uint8_t {
  kNone,  // the backend's weight dtype (cpu fp32, cuda bf16)
  kFp8,   // FP8 E4M3 with one fp32 scale per output row (per output channel), chosen at load
};

Result<Quantization> ParseQuantization(std::string_view name);  // "none" or "fp8"
// --quantization as given: "none", "fp8", or "auto" (the default): fp8 when `model` is a
// checkpoint directory whose config.json names FP8 weights (model/fp8_checkpoint.h), else none.
Result<Quantization> ResolveQuantization(std::string_view flag, const std::string& model);
std::string_view QuantizationName(Quantization q);

// Per-row FP8: scale[r] = max_k |w[r][k]| / 448 (1 for a zero row), q[r][k] = E4M3(w[r][k] /
// scale[r]) rounded to nearest even, so w ~ q * scale with the row's largest value at +-448.
// Computed in fp32 in exactly this order on every backend (cuda's kernel is its twin).
void QuantizeRowsFp8(const float* w, int64_t rows, int64_t cols, uint8_t* q, float* scale);
float RowScaleFp8(float amax);

}  // namespace gemma2
