// Gemma 2 model definition as read from a Hugging Face config.json (both dialects).
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace gemma2 {

enum class Architecture : uint8_t { kCausalLM, kSequenceClassification, kTokenClassification };
std::string_view ArchitectureName(Architecture a);

struct ModelConfig {
  Architecture architecture = Architecture::kCausalLM;
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t max_position_embeddings = 8192;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  double query_pre_attn_scalar = 0;    // scores are scaled by query_pre_attn_scalar^-0.5
  int64_t sliding_window = 0;          // 0: no sliding window anywhere
  double attn_logit_softcap = 0;       // 0: none
  double final_logit_softcap = 0;      // 0: none
  std::vector<bool> layer_is_sliding;  // one per layer, from layer_types or the default pattern
  bool tie_word_embeddings = true;
  int64_t bos_token_id = 2;
  int64_t pad_token_id = 0;
  std::vector<int64_t> eos_token_ids = {1};
  std::string torch_dtype;  // "bfloat16", ... (informational)
  // Classifiers only.
  int64_t num_labels = 0;
  std::vector<std::string> id2label;

  bool is_classifier() const { return architecture != Architecture::kCausalLM; }
  // The rows the final projection produces: vocab for causal LM, labels for classifiers.
  int64_t output_size() const { return is_classifier() ? num_labels : vocab_size; }
  int64_t q_size() const { return num_heads * head_dim; }
  int64_t kv_size() const { return num_kv_heads * head_dim; }
  // Checks internal consistency; the message names the offending fields.
  Status Validate() const;
};

// Parses config.json text. `source` names the file in error messages.
Result<ModelConfig> ParseModelConfig(std::string_view json_text, const std::string& source);
Result<ModelConfig> LoadModelConfig(const std::filesystem::path& config_json);

// Published shapes: "2b", "9b", "27b" (configs/gemma-2-*.json hold the same numbers as files).
Result<ModelConfig> PresetConfig(std::string_view name);
// The config.json text for `c` in the newer transformers dialect (written by our tools).
std::string ModelConfigToJson(const ModelConfig& c);

}  // namespace gemma2
