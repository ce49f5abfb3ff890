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
#include "model/safetensors.h"

namespace gemma2 {

// Rows [row_begin, row_end) x columns [col_begin, col_end) of a 2-D tensor (1-D: one row).
struct Region {
  int64_t row_begin = 0, row_end = 0, col_begin = 0, col_end = 0;
  int64_t rows() const { return row_end - row_begin; }
  int64_t cols() const { return col_end - col_begin; }
};

class Checkpoint {
 public:
  static Result<std::unique_ptr<Checkpoint>> Open(const std::filesystem::path& dir);

  const ModelConfig& config() const { return config_; }
  const std::filesystem::path& dir() const { return dir_; }
  // tokenizer.model beside the weights, or empty when the checkpoint has none.
  std::filesystem::path tokenizer_path() const;

  bool Has(const std::string& name) const { return Lookup(name) != nullptr; }
  // Shape of `name` as [rows, cols] (1-D tensors: [1, n]) after checking it equals `expected`.
  Status CheckShape(const std::string& name, const std::vector<int64_t>& expected) const;
  // Copies `region` of `name`, converted to `out` (F32 or BF16), densely row-major into dst.
  Status ReadRegion(const std::string& name, const Region& region, DType out, void* dst) const;

 private:
  struct Entry {
    const SafetensorsFile* file;
    const TensorInfo* info;
  };
  // Resolves a model-body name ("layers.0.mlp.up_proj.weight") with or without the "model." prefix.
  const Entry* Lookup(const std::string& name) const;
  Status OpenFiles(const std::vector<std::string>& files,
                   const std::map<std::string, std::string>* weight_map);

  std::filesystem::path dir_;
  ModelConfig config_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, Entry> tensors_;
};

}  // namespace gemma2
