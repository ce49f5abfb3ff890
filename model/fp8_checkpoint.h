// FP8 checkpoints as published: config.json's quantization_config names how the projection
// weights are stored (E4M3 bytes beside fp32 scales), and the loader dequantizes them.
//   transformers' FineGrainedFP8 (quant_method "fp8", weight_block_size [R, C]): a scale per
//     R x C block in `NAME.weight_scale_inv`, shape [ceil(rows / R), ceil(cols / C)];
//   compressed-tensors (quant_method "compressed-tensors", format "float-quantized", weights of
//     8-bit type "float"): `NAME.weight_scale`, shape [rows, 1] (strategy "channel") or [1] / []
//     (strategy "tensor"); a static `NAME.input_scale` is read past (activations are scaled per
//     token at run time).
// In both, weight = E4M3 value * scale.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "common/status.h"

namespace gemma2 {

struct Fp8Scheme {
  enum class Kind : uint8_t { kNone, kBlock, kChannel, kTensor };
  Kind kind = Kind::kNone;
  int64_t block_rows = 128, block_cols = 128;  // kBlock
  // The scale tensor of weight `name` ("....weight" -> "....weight_scale_inv" or "_scale").
  std::string ScaleName(const std::string& weight_name) const;
  // The scale tensor's shape for a [rows, cols] weight.
  std::vector<int64_t> ScaleShape(int64_t rows, int64_t cols) const;
  // Index into the (row-major) scale tensor for element (row, col).
  int64_t ScaleIndex(int64_t row, int64_t col, int64_t cols) const;
};

// The scheme config.json's quantization_config names; kNone without one. Anything else (another
// method, bit width, strategy or format) is an error naming the field.
Result<Fp8Scheme> Fp8SchemeFromConfig(const nlohmann::json& config, const std::string& where);

// The quantization_config a checkpoint written in `scheme` carries (gemma2-make-checkpoint).
nlohmann::json Fp8QuantizationConfig(const Fp8Scheme& scheme);

// Quantizes a [rows, cols] fp32 weight as `scheme` stores it: E4M3 bytes and the scale tensor
// (scale = max |block| / 448 per block, row or tensor; 1 where it is all zero).
void QuantizeForScheme(const Fp8Scheme& scheme, const float* w, int64_t rows, int64_t cols,
                       std::vector<uint8_t>* q, std::vector<float>* scale);

}  // namespace gemma2
