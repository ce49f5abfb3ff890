// Where a rank's weights come from: a checkpoint directory, or deterministic random weights of any
// shape (full-size presets without a checkpoint, for benchmarks and scale tests).
#pragma once

#include <memory>
#include <span>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "common/status.h"
#include "model/config.h"

namespace gemma2 {

// Rows [row_begin, row_end) x columns [col_begin, col_end) of a 2-D tensor (1-D: one row).
struct Region {
  int64_t row_begin = 0, row_end = 0, col_begin = 0, col_end = 0;
  int64_t rows() const { return row_end - row_begin; }
  int64_t cols() const { return col_end - col_begin; }
};

class WeightSource {
 public:
  virtual ~WeightSource() = default;
  virtual const ModelConfig& config() const = 0;
  // Tensor names are Hugging Face's without the "model." prefix of the body
  // ("layers.0.mlp.up_proj.weight", "embed_tokens.weight", "score.weight").
  virtual bool Has(const std::string& name) const = 0;
  // OK when `name` exists with exactly `expected` shape and a float dtype; else says what differs.
  virtual Status CheckShape(const std::string& name,
                            const std::vector<int64_t>& expected) const = 0;
  // Copies `region` of `name`, converted to `out` (F32 or BF16), densely row-major into dst.
  virtual Status ReadRegion(const std::string& name, const Region& region, DType out,
                            void* dst) const = 0;
  // A hint: `region` of `name` will be read soon (a checkpoint starts reading it from disk in the
  // background). Unknown names and bad regions are ignored here; ReadRegion reports them.
  virtual void WillRead(const std::string& name, const Region& region) const {}
};

// A part of a weight: `region` of tensor `name`, whose shape must be `full_shape`. A weight of
// several parts stacks their regions by rows (q|k|v, gate|up); all have the same width.
struct WeightPart {
  std::string name;
  std::vector<int64_t> full_shape;
  Region region;
};

// Rows [row_begin, row_end) of the stack of `parts`, converted to `out`, densely into dst.
Status ReadStackedRows(const WeightSource& source, std::span<const WeightPart> parts, DType out,
                       int64_t row_begin, int64_t row_end, void* dst);

// Deterministic random weights for `config`: element i of tensor `name` depends only on (seed,
// name, i), so every tensor-parallel slicing of the model sees the same numbers.
class RandomWeights final : public WeightSource {
 public:
  RandomWeights(ModelConfig config, uint64_t seed) : config_(std::move(config)), seed_(seed) {}
  const ModelConfig& config() const override { return config_; }
  bool Has(const std::string& name) const override;
  Status CheckShape(const std::string& name, const std::vector<int64_t>& expected) const override;
  Status ReadRegion(const std::string& name, const Region& region, DType out,
                    void* dst) const override;

 private:
  std::vector<int64_t> ShapeOf(const std::string& name) const;  // empty: no such tensor
  ModelConfig config_;
  uint64_t seed_;
};

}  // namespace gemma2

namespace gemma2 {

// What a cluster's workers load, named by one string they all receive: a checkpoint directory, or
// "random:SHAPE:SEED[:LAYERS]" — random weights of a preset (2b, 9b, 27b) or of a config.json
// path, cut to the first LAYERS layers when given (widths exact).
Result<std::unique_ptr<WeightSource>> OpenWeightSource(const std::string& model);
std::string RandomWeightsSpec(const std::string& shape, uint64_t seed, int64_t layers);

}  // namespace gemma2
