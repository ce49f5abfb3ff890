#include "model/fp8_checkpoint.h"

#include <algorithm>
#include <cmath>

#include "common/dtype.h"
#include "model/quantization.h"

namespace gemma2 {
namespace {

using nlohmann::json;

Status Bad(const std::string& where, const std::string& field, const std::string& what) {
  return Unimplemented(where + ": quantization_config." + field + " " + what +
                       "; FP8 checkpoints load from transformers' fp8 (block scales) or "
                       "compressed-tensors float-quantized 8-bit weights (channel or tensor scales)");
}

Result<Fp8Scheme> ParseScheme(const nlohmann::json& config, const std::string& where);

}  // namespace

std::string Fp8Scheme::ScaleName(const std::string& weight_name) const {
  return weight_name + (kind == Kind::kBlock ? "_scale_inv" : "_scale");
}

std::vector<int64_t> Fp8Scheme::ScaleShape(int64_t rows, int64_t cols) const {
  switch (kind) {
    case Kind::kBlock:
      return {(rows + block_rows - 1) / block_rows, (cols + block_cols - 1) / block_cols};
    case Kind::kChannel:
      return {rows, 1};
    default:
      return {1};
  }
}

int64_t Fp8Scheme::ScaleIndex(int64_t row, int64_t col, int64_t cols) const {
  switch (kind) {
    case Kind::kBlock:
      return (row / block_rows) * ((cols + block_cols - 1) / block_cols) + col / block_cols;
    case Kind::kChannel:
      return row;
    default:
      return 0;
  }
}

Result<Fp8Scheme> Fp8SchemeFromConfig(const json& config, const std::string& where) {
  try {
    return ParseScheme(config, where);
  } catch (const json::exception& e) {  // a field of the wrong JSON type
    return InvalidArgument(where + ": quantization_config: " + e.what());
  }
}

namespace {
constexpr int64_t kMaxBlock = int64_t{1} << 20;  // scale-shape arithmetic stays far from overflow

Result<Fp8Scheme> ParseScheme(const json& config, const std::string& where) {
  Fp8Scheme s;
  auto qc = config.find("quantization_config");
  if (qc == config.end() || qc->is_null()) return s;
  if (!qc->is_object()) return Bad(where, "", "is not an object");
  const std::string method = qc->value("quant_method", "");
  if (method == "fp8") {
    s.kind = Fp8Scheme::Kind::kBlock;
    const auto bs = qc->find("weight_block_size");
    if (bs == qc->end() || bs->is_null()) {
      return Bad(where, "weight_block_size", "is missing (per-tensor transformers fp8 is not read)");
    }
    if (!bs->is_array() || bs->size() != 2 || !(*bs)[0].is_number_integer() ||
        !(*bs)[1].is_number_integer() || (*bs)[0].get<int64_t>() <= 0 ||
        (*bs)[1].get<int64_t>() <= 0 || (*bs)[0].get<int64_t>() > kMaxBlock ||
        (*bs)[1].get<int64_t>() > kMaxBlock) {
      return Bad(where, "weight_block_size", "must be two integers in [1, 2^20]");
    }
    s.block_rows = (*bs)[0].get<int64_t>();
    s.block_cols = (*bs)[1].get<int64_t>();
    const std::string fmt = qc->value("fmt", "e4m3");
    if (fmt != "e4m3") return Bad(where, "fmt", "is '" + fmt + "', not e4m3");
    return s;
  }
  if (method != "compressed-tensors") return Bad(where, "quant_method", "is '" + method + "'");
  const std::string format = qc->value("format", "");
  if (format != "float-quantized") return Bad(where, "format", "is '" + format + "'");
  const auto groups = qc->find("config_groups");
  if (groups == qc->end() || !groups->is_object() || groups->size() != 1) {
    return Bad(where, "config_groups", "must hold exactly one group");
  }
  const json& g = groups->begin().value();
  const auto w = g.find("weights");
  if (w == g.end() || !w->is_object()) return Bad(where, "config_groups.*.weights", "is missing");
  if (w->value("num_bits", 0) != 8 || w->value("type", "") != "float") {
    return Bad(where, "config_groups.*.weights", "is not 8-bit float");
  }
  const std::string strategy = w->value("strategy", "");
  if (strategy == "channel") {
    s.kind = Fp8Scheme::Kind::kChannel;
  } else if (strategy == "tensor") {
    s.kind = Fp8Scheme::Kind::kTensor;
  } else {
    return Bad(where, "config_groups.*.weights.strategy", "is '" + strategy + "'");
  }
  return s;
}

}  // namespace

json Fp8QuantizationConfig(const Fp8Scheme& s) {
  if (s.kind == Fp8Scheme::Kind::kBlock) {
    return {{"quant_method", "fp8"},
            {"activation_scheme", "dynamic"},
            {"fmt", "e4m3"},
            {"weight_block_size", {s.block_rows, s.block_cols}}};
  }
  const bool channel = s.kind == Fp8Scheme::Kind::kChannel;
  return {{"quant_method", "compressed-tensors"},
          {"format", "float-quantized"},
          {"quantization_status", "compressed"},
          {"ignore", {"lm_head"}},
          {"config_groups",
           {{"group_0",
             {{"targets", {"Linear"}},
              {"weights",
               {{"num_bits", 8},
                {"type", "float"},
                {"symmetric", true},
                {"dynamic", false},
                {"strategy", channel ? "channel" : "tensor"}}},
              {"input_activations",
               {{"num_bits", 8},
                {"type", "float"},
                {"symmetric", true},
                {"dynamic", true},
                {"strategy", "token"}}}}}}}};
}

void QuantizeForScheme(const Fp8Scheme& s, const float* w, int64_t rows, int64_t cols,
                       std::vector<uint8_t>* q, std::vector<float>* scale) {
  const auto shape = s.ScaleShape(rows, cols);
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  std::vector<float> amax(static_cast<size_t>(n), 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      float& a = amax[static_cast<size_t>(s.ScaleIndex(r, c, cols))];
      a = std::fmax(a, std::fabs(w[r * cols + c]));
    }
  }
  scale->resize(amax.size());
  for (size_t i = 0; i < amax.size(); ++i) (*scale)[i] = RowScaleFp8(amax[i]);
  q->resize(static_cast<size_t>(rows * cols));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const float sc = (*scale)[static_cast<size_t>(s.ScaleIndex(r, c, cols))];
      (*q)[static_cast<size_t>(r * cols + c)] = F32ToF8E4M3(w[r * cols + c] / sc);
    }
  }
}

}  // namespace gemma2
