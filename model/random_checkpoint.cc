#include "model/random_checkpoint.h"

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

#include "model/safetensors.h"

namespace gemma2 {
namespace {

// SplitMix64 + Box-Muller: the same numbers on every platform and standard library.
class Rng {
 public:
  explicit Rng(uint64_t seed) : s_(seed) {}
  uint64_t Next() {
    uint64_t z = (s_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double Uniform() { return (static_cast<double>(Next() >> 11) + 0.5) * 0x1.0p-53; }
  double Normal() {
    return std::sqrt(-2.0 * std::log(Uniform())) * std::cos(2.0 * M_PI * Uniform());
  }

 private:
  uint64_t s_;
};

TensorToWrite MakeTensor(const std::string& name, std::vector<int64_t> shape, float stddev,
                         DType dtype, Rng& rng) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  TensorToWrite t{name, dtype, std::move(shape), {}};
  t.bytes.resize(static_cast<size_t>(n * DTypeSize(dtype)));
  for (int64_t i = 0; i < n; ++i) {
    const float v = static_cast<float>(rng.Normal()) * stddev;
    if (dtype == DType::kF32) {
      std::memcpy(t.bytes.data() + 4 * i, &v, 4);
    } else if (dtype == DType::kBF16) {
      const uint16_t b = F32ToBf16(v);
      std::memcpy(t.bytes.data() + 2 * i, &b, 2);
    } else {  // F16, round to nearest
      const uint16_t h = F32ToF16(v);
      std::memcpy(t.bytes.data() + 2 * i, &h, 2);
    }
  }
  return t;
}

// A projection weight: random like MakeTensor, then stored as `scheme` stores it (the E4M3 tensor
// and its scale tensor), or as MakeTensor's when there is no scheme.
void AddProjection(std::vector<TensorToWrite>& all, const std::string& name,
                   std::vector<int64_t> shape, const RandomCheckpointOptions& o, Rng& rng) {
  if (o.fp8.kind == Fp8Scheme::Kind::kNone) {
    all.push_back(MakeTensor(name, std::move(shape), o.weight_std, o.dtype, rng));
    return;
  }
  TensorToWrite f = MakeTensor(name, shape, o.weight_std, DType::kF32, rng);
  std::vector<uint8_t> q;
  std::vector<float> scale;
  QuantizeForScheme(o.fp8, reinterpret_cast<const float*>(f.bytes.data()), shape[0], shape[1], &q,
                    &scale);
  if (o.fp8_dequantized) {
    float* v = reinterpret_cast<float*>(f.bytes.data());
    for (int64_t r = 0; r < shape[0]; ++r) {
      for (int64_t k = 0; k < shape[1]; ++k) {
        const size_t i = static_cast<size_t>(r * shape[1] + k);
        v[i] = F8E4M3ToF32(q[i]) * scale[static_cast<size_t>(o.fp8.ScaleIndex(r, k, shape[1]))];
      }
    }
    all.push_back(std::move(f));
    return;
  }
  all.push_back({name, DType::kF8E4M3, shape, std::move(q)});
  TensorToWrite s{o.fp8.ScaleName(name), DType::kF32, o.fp8.ScaleShape(shape[0], shape[1]), {}};
  s.bytes.resize(scale.size() * 4);
  std::memcpy(s.bytes.data(), scale.data(), s.bytes.size());
  all.push_back(std::move(s));
}

}  // namespace

Status WriteRandomCheckpoint(const ModelConfig& c, const std::filesystem::path& dir,
                             const RandomCheckpointOptions& o) {
  RETURN_IF_ERROR(c.Validate());
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return Internal(dir.string() + ": cannot create: " + ec.message());
  Rng rng(o.seed);
  const int64_t h = c.hidden_size;
  std::vector<TensorToWrite> all;
  all.push_back(
      MakeTensor("model.embed_tokens.weight", {c.vocab_size, h}, o.embed_std, o.dtype, rng));
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    for (const char* norm : {"input_layernorm", "post_attention_layernorm",
                             "pre_feedforward_layernorm", "post_feedforward_layernorm"}) {
      all.push_back(MakeTensor(p + norm + ".weight", {h}, o.norm_std, o.dtype, rng));
    }
    AddProjection(all, p + "self_attn.q_proj.weight", {c.q_size(), h}, o, rng);
    AddProjection(all, p + "self_attn.k_proj.weight", {c.kv_size(), h}, o, rng);
    AddProjection(all, p + "self_attn.v_proj.weight", {c.kv_size(), h}, o, rng);
    AddProjection(all, p + "self_attn.o_proj.weight", {h, c.q_size()}, o, rng);
    AddProjection(all, p + "mlp.gate_proj.weight", {c.intermediate_size, h}, o, rng);
    AddProjection(all, p + "mlp.up_proj.weight", {c.intermediate_size, h}, o, rng);
    AddProjection(all, p + "mlp.down_proj.weight", {h, c.intermediate_size}, o, rng);
  }
  all.push_back(MakeTensor("model.norm.weight", {h}, o.norm_std, o.dtype, rng));
  if (c.is_classifier()) {
    all.push_back(MakeTensor("score.weight", {c.num_labels, h}, o.weight_std, o.dtype, rng));
    if (c.architecture == Architecture::kTokenClassification) {
      all.push_back(MakeTensor("score.bias", {c.num_labels}, o.weight_std, o.dtype, rng));
    }
  }
  {
    std::ofstream cfg(dir / "config.json");
    if (o.fp8.kind == Fp8Scheme::Kind::kNone || o.fp8_dequantized) {
      cfg << ModelConfigToJson(c);
    } else {
      nlohmann::json j = nlohmann::json::parse(ModelConfigToJson(c));
      j["quantization_config"] = Fp8QuantizationConfig(o.fp8);
      cfg << j.dump(2) << "\n";
    }
    if (!cfg) return Internal((dir / "config.json").string() + ": write failed");
  }
  if (o.shards <= 1) return WriteSafetensors(dir / "model.safetensors", all);

  nlohmann::json index;
  index["metadata"] = nlohmann::json::object();
  index["weight_map"] = nlohmann::json::object();
  const size_t per =
      (all.size() + static_cast<size_t>(o.shards) - 1) / static_cast<size_t>(o.shards);
  for (int s = 0; s < o.shards; ++s) {
    char name[64];
    std::snprintf(name, sizeof(name), "model-%05d-of-%05d.safetensors", s + 1, o.shards);
    std::vector<TensorToWrite> part;
    for (size_t i = static_cast<size_t>(s) * per;
         i < std::min(all.size(), (static_cast<size_t>(s) + 1) * per); ++i) {
      index["weight_map"][all[i].name] = name;
      part.push_back(std::move(all[i]));
    }
    RETURN_IF_ERROR(WriteSafetensors(dir / name, part));
  }
  std::ofstream idx(dir / "model.safetensors.index.json");
  idx << index.dump(2) << "\n";
  return idx ? OkStatus() : Internal("cannot write the shard index");
}

}  // namespace gemma2
