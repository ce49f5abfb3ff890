#include "model/weight_source.h"

#include <algorithm>
#include <cmath>
#include <thread>

namespace gemma2 {
namespace {

uint64_t Mix(uint64_t z) {  // SplitMix64 finalizer
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

uint64_t HashName(const std::string& s) {
  uint64_t h = 1469598103934665603ull;  // FNV-1a
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}

// Approximately normal (sum of four uniforms, variance 1): cheap enough for 27B elements.
float Normalish(uint64_t key) {
  const uint64_t a = Mix(key), b = Mix(key ^ 0x9E3779B97F4A7C15ull);
  float s = 0;
  for (int k = 0; k < 2; ++k) {
    s += static_cast<float>((a >> (32 * k)) & 0xffffffffu) * 0x1.0p-32f;
    s += static_cast<float>((b >> (32 * k)) & 0xffffffffu) * 0x1.0p-32f;
  }
  return (s - 2.0f) * 1.7320508f;  // (sum - mean) / sqrt(4/12)
}

// Stddev by role: embeddings O(1) like trained Gemma, projections 0.02 (transformers' init),
// norm weights small so (1 + w) ~ 1.
float StdFor(const std::string& name) {
  if (name.find("embed_tokens") != std::string::npos) return 1.0f;
  if (name.find("norm") != std::string::npos) return 0.1f;
  return 0.02f;
}

}  // namespace

std::vector<int64_t> RandomWeights::ShapeOf(const std::string& name) const {
  const ModelConfig& c = config_;
  const int64_t h = c.hidden_size;
  if (name == "embed_tokens.weight") return {c.vocab_size, h};
  if (name == "norm.weight") return {h};
  if (name == "score.weight" && c.is_classifier()) return {c.num_labels, h};
  if (name == "score.bias" && c.architecture == Architecture::kTokenClassification)
    return {c.num_labels};
  if (name.rfind("layers.", 0) != 0) return {};
  const size_t dot = name.find('.', 7);
  if (dot == std::string::npos) return {};
  const int64_t layer = std::atoll(name.substr(7, dot - 7).c_str());
  if (layer < 0 || layer >= c.num_layers) return {};
  const std::string rest = name.substr(dot + 1);
  if (rest.find("layernorm.weight") != std::string::npos) return {h};
  if (rest == "self_attn.q_proj.weight") return {c.q_size(), h};
  if (rest == "self_attn.k_proj.weight" || rest == "self_attn.v_proj.weight")
    return {c.kv_size(), h};
  if (rest == "self_attn.o_proj.weight") return {h, c.q_size()};
  if (rest == "mlp.gate_proj.weight" || rest == "mlp.up_proj.weight")
    return {c.intermediate_size, h};
  if (rest == "mlp.down_proj.weight") return {h, c.intermediate_size};
  return {};
}

bool RandomWeights::Has(const std::string& name) const { return !ShapeOf(name).empty(); }

Status RandomWeights::CheckShape(const std::string& name,
                                 const std::vector<int64_t>& expected) const {
  const auto shape = ShapeOf(name);
  if (shape.empty()) return NotFound("random weights have no tensor '" + name + "'");
  if (shape != expected) return Internal("random weights: shape mismatch for '" + name + "'");
  return OkStatus();
}

Status RandomWeights::ReadRegion(const std::string& name, const Region& r, DType out,
                                 void* dst) const {
  const auto shape = ShapeOf(name);
  if (shape.empty()) return NotFound("random weights have no tensor '" + name + "'");
  const int64_t cols = shape.size() == 2 ? shape[1] : shape[0];
  const int64_t rows = shape.size() == 2 ? shape[0] : 1;
  if (r.row_begin < 0 || r.row_end > rows || r.col_begin < 0 || r.col_end > cols ||
      r.row_begin > r.row_end || r.col_begin > r.col_end) {
    return InvalidArgument("random weights: region outside '" + name + "'");
  }
  if (out != DType::kF32 && out != DType::kBF16)
    return Internal("ReadRegion: unsupported output dtype");
  const uint64_t base = Mix(seed_ ^ HashName(name));
  const float stddev = StdFor(name);
  auto fill_rows = [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row) {
      for (int64_t col = r.col_begin; col < r.col_end; ++col) {
        const float v = Normalish(base + static_cast<uint64_t>(row * cols + col)) * stddev;
        const int64_t i = (row - r.row_begin) * r.cols() + (col - r.col_begin);
        if (out == DType::kF32) {
          static_cast<float*>(dst)[i] = v;
        } else {
          static_cast<uint16_t*>(dst)[i] = F32ToBf16(v);
        }
      }
    }
  };
  const int64_t n = r.rows() * r.cols();
  const int64_t threads = std::min<int64_t>(std::max(1u, std::thread::hardware_concurrency()),
                                            std::max<int64_t>(1, n >> 20));
  if (threads <= 1) {
    fill_rows(r.row_begin, r.row_end);
    return OkStatus();
  }
  std::vector<std::thread> pool;
  const int64_t per = (r.rows() + threads - 1) / threads;
  for (int64_t t = 0; t < threads; ++t) {
    const int64_t r0 = r.row_begin + t * per, r1 = std::min(r.row_end, r0 + per);
    if (r0 < r1) pool.emplace_back(fill_rows, r0, r1);
  }
  for (auto& th : pool) th.join();
  return OkStatus();
}

}  // namespace gemma2

#include "model/checkpoint.h"

namespace gemma2 {

std::string RandomWeightsSpec(const std::string& shape, uint64_t seed, int64_t layers) {
  std::string s = "random:";
  s += shape;
  s += ':';
  s += std::to_string(seed);
  if (layers > 0) {
    s += ':';
    s += std::to_string(layers);
  }
  return s;
}

namespace {
Status BadSpec(const std::string& model, const char* why) {
  std::string m = "model '";
  m += model;
  m += "': ";
  m += why;
  return InvalidArgument(m);
}
}  // namespace

Status ReadStackedRows(const WeightSource& source, std::span<const WeightPart> parts, DType out,
                       int64_t row_begin, int64_t row_end, void* dst) {
  int64_t start = 0;  // the stack's row where the current part begins
  for (const WeightPart& p : parts) {
    const int64_t lo = std::max(row_begin, start), hi = std::min(row_end, start + p.region.rows());
    if (lo < hi) {
      Region sub = p.region;
      sub.row_begin = p.region.row_begin + (lo - start);
      sub.row_end = p.region.row_begin + (hi - start);
      RETURN_IF_ERROR(source.ReadRegion(
          p.name, sub, out,
          static_cast<uint8_t*>(dst) + (lo - row_begin) * p.region.cols() * DTypeSize(out)));
    }
    start += p.region.rows();
  }
  return OkStatus();
}

Result<std::unique_ptr<WeightSource>> OpenWeightSource(const std::string& model) {
  const std::string prefix = "random:";
  if (model.rfind(prefix, 0) != 0) {
    ASSIGN_OR_RETURN(auto ck, Checkpoint::Open(model));
    return std::unique_ptr<WeightSource>(std::move(ck));
  }
  std::vector<std::string> parts;
  size_t pos = prefix.size();
  while (pos <= model.size()) {
    const size_t colon = std::min(model.find(':', pos), model.size());
    parts.push_back(model.substr(pos, colon - pos));
    pos = colon + 1;
  }
  if (parts.size() < 2 || parts.size() > 3 || parts[0].empty()) {
    return BadSpec(model, "expected random:SHAPE:SEED[:LAYERS]");
  }
  uint64_t seed = 0;
  int64_t layers = 0;
  try {
    seed = std::stoull(parts[1]);
    if (parts.size() == 3) layers = std::stoll(parts[2]);
  } catch (...) {
    return BadSpec(model, "SEED and LAYERS must be numbers");
  }
  const bool is_file = parts[0].find('/') != std::string::npos || parts[0].ends_with(".json");
  ASSIGN_OR_RETURN(ModelConfig c, is_file ? LoadModelConfig(parts[0]) : PresetConfig(parts[0]));
  if (layers > 0) {
    if (layers > c.num_layers) return BadSpec(model, "more layers than the shape has");
    c.num_layers = layers;
    c.layer_is_sliding.resize(static_cast<size_t>(layers));
  }
  return std::unique_ptr<WeightSource>(std::make_unique<RandomWeights>(c, seed));
}

}  // namespace gemma2
