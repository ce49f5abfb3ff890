// Element types of checkpoint tensors and their conversions to fp32.
#pragma once

#include <bit>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string_view>

namespace gemma2 {

enum class DType : uint8_t { kF32, kF16, kBF16, kF64, kI64, kI32, kI16, kI8, kU8, kBool, kF8E4M3 };

// Safetensors names ("BF16", "F32", ...). nullopt for a name safetensors does not define.
std::optional<DType> DTypeFromSafetensorsName(std::string_view name);
std::string_view DTypeName(DType t);
int64_t DTypeSize(DType t);
// True for the types model weights may have (bf16, fp16, fp32).
inline bool IsWeightDType(DType t) {
  return t == DType::kF32 || t == DType::kF16 || t == DType::kBF16;
}

inline float Bf16ToF32(uint16_t b) { return std::bit_cast<float>(static_cast<uint32_t>(b) << 16); }

// Round-to-nearest-even, NaN kept quiet; what torch's .to(bfloat16) does.
inline uint16_t F32ToBf16(float f) {
  uint32_t u = std::bit_cast<uint32_t>(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

float F16ToF32(uint16_t h);
// Round-to-nearest-even; overflow goes to infinity, tiny values to (signed) zero or subnormals.
uint16_t F32ToF16(float f);

// FP8 E4M3 ("fn": no infinities, one NaN per sign, largest finite 448), as torch's
// float8_e4m3fn and CUDA's __nv_fp8_e4m3 store it.
inline constexpr float kF8E4M3Max = 448.0f;
float F8E4M3ToF32(uint8_t v);
// Round-to-nearest-even; beyond +-448 (infinity too) saturates to +-448, NaN stays NaN: what
// CUDA's __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3) does.
uint8_t F32ToF8E4M3(float f);

// Converts n little-endian elements of `src_type` at `src` to fp32. Weight types only.
void ConvertToF32(DType src_type, const void* src, float* dst, int64_t n);

}  // namespace gemma2
