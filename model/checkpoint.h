// A Hugging Face checkpoint directory: config.json, model.safetensors or shards listed in
// model.safetensors.index.json, optional tokenizer.model. Hands out slices of tensors so a
// tensor-parallel rank reads only its part.
#pragma once

#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "common/status.h"
#include "model/config.h"
#include "model/fp8_checkpoint.h"
#include "model/read_ahead.h"
#include "model/safetensors.h"
#include "model/weight_source.h"

namespace gemma2 {

class Checkpoint final : public WeightSource {
 public:
  static Result<std::unique_ptr<Checkpoint>> Open(const std::filesystem::path& dir);

  const ModelConfig& config() const override { return config_; }
  const std::filesystem::path& dir() const { return dir_; }
  // tokenizer.model beside the weights, or empty when the checkpoint has none.
  std::filesystem::path tokenizer_path() const;

  bool Has(const std::string& name) const override { return Lookup(name) != nullptr; }
  Status CheckShape(const std::string& name, const std::vector<int64_t>& expected) const override;
  Status ReadRegion(const std::string& name, const Region& region, DType out,
                    void* dst) const override;
  void WillRead(const std::string& name, const Region& region) const override;
  ReadAhead& read_ahead() const { return read_ahead_; }  // what WillRead queued (tests, stats)
  // How FP8 weights are stored (kNone: the checkpoint has none); they read as their
  // dequantized values.
  const Fp8Scheme& fp8_scheme() const { return fp8_; }

 private:
  struct Entry {
    const SafetensorsFile* file;
    const TensorInfo* info;
  };
  // Resolves a model-body name ("layers.0.mlp.up_proj.weight") with or without the "model." prefix.
  const Entry* Lookup(const std::string& name) const;
  // The fp32 scales of FP8 weight `e` (its whole scale tensor), checked against its shape.
  Result<std::vector<float>> ReadScales(const Entry& e) const;
  Status OpenFiles(const std::vector<std::string>& files,
                   const std::map<std::string, std::string>* weight_map);

  std::filesystem::path dir_;
  ModelConfig config_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, Entry> tensors_;
  mutable ReadAhead read_ahead_;
  Fp8Scheme fp8_;
};

}  // namespace gemma2
