// Writes a Gemma 2 checkpoint with deterministic random weights in Hugging Face's layout
// (config.json + model.safetensors or shards with model.safetensors.index.json).
#pragma once

#include <filesystem>

#include "common/dtype.h"
#include "common/status.h"
#include "model/config.h"
#include "model/fp8_checkpoint.h"

namespace gemma2 {

struct RandomCheckpointOptions {
  uint64_t seed = 0;
  DType dtype = DType::kBF16;
  int shards = 1;  // > 1: model-0000i-of-0000n.safetensors + index
  float weight_std = 0.02f;
  float embed_std = 1.0f;
  float norm_std = 0.1f;  // norm weights w; the scale applied is (1 + w)
  // kNone: projections in `dtype`; else stored as that FP8 scheme writes them (E4M3 bytes and
  // fp32 scales, the quantization_config in config.json), as published FP8 checkpoints are.
  Fp8Scheme fp8;
  // With `fp8`: write the values that scheme stores, dequantized, as plain F32 tensors (no
  // quantization_config): the reference an FP8 checkpoint must load as.
  bool fp8_dequantized = false;
};

Status WriteRandomCheckpoint(const ModelConfig& config, const std::filesystem::path& dir,
                             const RandomCheckpointOptions& opts);

}  // namespace gemma2
