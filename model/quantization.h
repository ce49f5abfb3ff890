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

// The KV cache's element type (--kv-cache-dtype). kAuto: the backend's activation dtype (cpu fp32,
// cuda bf16). kFp8: FP8 E4M3 with one fp32 scale per (position, kv head) for keys and for values,
// chosen as each position is written: scale = max |x| / 448 over the head's head_dim values (1 for
// a zero vector), as QuantizeRowsFp8 does per row. Dynamic scales need no calibration (a
// checkpoint's static k/v scales would) and one position's outlier coarsens no other; they cost
// 4 bytes per head_dim bytes (3.1% at head_dim 128, 1.6% at 256). Every reader of the cache, and
// a fresh prefill's attention over the step's own keys and values, sees the rounded values.
enum class KvCacheDtype : uint8_t { kAuto, kFp8 };
// "auto", "fp8" or "fp8_e4m3" (vLLM's names); fp8_e5m2 and anything else are refused by name.
Result<KvCacheDtype> ParseKvCacheDtype(std::string_view name);
std::string_view KvCacheDtypeName(KvCacheDtype d);
// x (rows of `cols`, one kv head's key or value each) rounded in place through E4M3 with each
// row's own scale: x = E4M3(x / scale) * scale. The reference every backend's cache write follows.
void RoundRowsThroughFp8(float* x, int64_t rows, int64_t cols);

}  // namespace gemma2
