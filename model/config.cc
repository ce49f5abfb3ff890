#include "model/config.h"

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "common/json_depth.h"

namespace gemma2 {
namespace {

using nlohmann::json;

Status FieldError(const std::string& source, const std::string& field, const std::string& why) {
  return InvalidArgument(source + ": field '" + field + "' " + why);
}

// Reads a required or optional integer field; the message names the file and field.
Status GetInt(const json& j, const std::string& source, const char* key, bool required,
              int64_t* out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    return required ? FieldError(source, key, "is missing") : OkStatus();
  }
  if (!it->is_number_integer()) return FieldError(source, key, "must be an integer");
  *out = it->get<int64_t>();
  return OkStatus();
}

Status GetDouble(const json& j, const std::string& source, const char* key, bool required,
                 double* out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    return required ? FieldError(source, key, "is missing") : OkStatus();
  }
  if (!it->is_number()) return FieldError(source, key, "must be a number");
  *out = it->get<double>();
  return OkStatus();
}

Status ParseArchitecture(const json& j, const std::string& source, Architecture* out) {
  auto it = j.find("architectures");
  if (it == j.end() || !it->is_array() || it->empty() || !(*it)[0].is_string()) {
    return FieldError(source, "architectures",
                      "is missing (expected e.g. [\"Gemma2ForCausalLM\"])");
  }
  const std::string name = (*it)[0].get<std::string>();
  if (name == "Gemma2ForCausalLM") {
    *out = Architecture::kCausalLM;
  } else if (name == "Gemma2ForSequenceClassification") {
    *out = Architecture::kSequenceClassification;
  } else if (name == "Gemma2ForTokenClassification") {
    *out = Architecture::kTokenClassification;
  } else {
    return Unimplemented(source + ": unknown architecture '" + name +
                         "' (supported: Gemma2ForCausalLM, Gemma2ForSequenceClassification, "
                         "Gemma2ForTokenClassification)");
  }
  return OkStatus();
}

Status ParseActivation(const json& j, const std::string& source) {
  // Published checkpoints carry both hidden_act and hidden_activation; transformers uses the
  // latter.
  for (const char* key : {"hidden_activation", "hidden_act"}) {
    auto it = j.find(key);
    if (it == j.end() || it->is_null()) continue;
    if (!it->is_string()) return FieldError(source, key, "must be a string");
    const std::string act = it->get<std::string>();
    if (act != "gelu_pytorch_tanh" && act != "gelu_tanh") {
      return Unimplemented(source + ": unsupported activation " + key + "='" + act +
                           "' (Gemma 2 uses gelu_pytorch_tanh)");
    }
    return OkStatus();
  }
  return OkStatus();  // transformers' default is gelu_pytorch_tanh
}

Status ParseRope(const json& j, const std::string& source, double* theta) {
  // Newer dialect: rope_parameters {rope_type, rope_theta}; published: top-level rope_theta.
  auto rp = j.find("rope_parameters");
  if (rp != j.end() && rp->is_object()) {
    auto type = rp->find("rope_type");
    if (type != rp->end() && type->is_string() && type->get<std::string>() != "default") {
      return Unimplemented(source + ": rope_parameters.rope_type '" + type->get<std::string>() +
                           "' is not supported (only 'default')");
    }
    RETURN_IF_ERROR(GetDouble(*rp, source + " rope_parameters", "rope_theta", false, theta));
    return OkStatus();
  }
  auto rs = j.find("rope_scaling");
  if (rs != j.end() && !rs->is_null()) {
    return Unimplemented(source + ": rope_scaling is not supported by Gemma 2");
  }
  return GetDouble(j, source, "rope_theta", false, theta);
}

Status ParseLayerTypes(const json& j, const std::string& source, ModelConfig* c) {
  auto it = j.find("layer_types");
  if (it == j.end() || it->is_null()) {
    // transformers' default: sliding on even layers (0, 2, 4, ...).
    c->layer_is_sliding.resize(static_cast<size_t>(c->num_layers));
    for (int64_t i = 0; i < c->num_layers; ++i) c->layer_is_sliding[i] = (i % 2 == 0);
    return OkStatus();
  }
  if (!it->is_array()) return FieldError(source, "layer_types", "must be a list");
  if (static_cast<int64_t>(it->size()) != c->num_layers) {
    return FieldError(source, "layer_types",
                      "has " + std::to_string(it->size()) + " entries but num_hidden_layers is " +
                          std::to_string(c->num_layers));
  }
  c->layer_is_sliding.clear();
  for (const auto& t : *it) {
    if (!t.is_string()) return FieldError(source, "layer_types", "entries must be strings");
    const std::string s = t.get<std::string>();
    if (s == "sliding_attention") {
      c->layer_is_sliding.push_back(true);
    } else if (s == "full_attention") {
      c->layer_is_sliding.push_back(false);
    } else {
      return FieldError(source, "layer_types", "has unknown entry '" + s + "'");
    }
  }
  return OkStatus();
}

Status ParseLabels(const json& j, const std::string& source, ModelConfig* c) {
  auto it = j.find("id2label");
  if (it != j.end() && it->is_object()) {
    c->id2label.assign(it->size(), "");
    for (const auto& [key, value] : it->items()) {
      char* end = nullptr;
      const long id = std::strtol(key.c_str(), &end, 10);
      if (end == key.c_str() || *end != '\0' || id < 0 || id >= static_cast<long>(it->size()) ||
          !value.is_string()) {
        return FieldError(source, "id2label", "must map \"0\"..\"N-1\" to strings");
      }
      c->id2label[static_cast<size_t>(id)] = value.get<std::string>();
    }
  }
  int64_t n = static_cast<int64_t>(c->id2label.size());
  RETURN_IF_ERROR(GetInt(j, source, "num_labels", false, &n));
  if (n <= 0) return FieldError(source, "num_labels", "must be positive for a classifier");
  if (!c->id2label.empty() && static_cast<int64_t>(c->id2label.size()) != n) {
    return FieldError(source, "num_labels", "disagrees with id2label");
  }
  c->num_labels = n;
  if (c->id2label.empty()) {
    for (int64_t i = 0; i < n; ++i) c->id2label.push_back("LABEL_" + std::to_string(i));
  }
  return OkStatus();
}

}  // namespace

std::string_view ArchitectureName(Architecture a) {
  switch (a) {
    case Architecture::kCausalLM:
      return "Gemma2ForCausalLM";
    case Architecture::kSequenceClassification:
      return "Gemma2ForSequenceClassification";
    case Architecture::kTokenClassification:
      return "Gemma2ForTokenClassification";
  }
  return "?";
}

Status ModelConfig::Validate() const {
  auto positive = [](int64_t v) { return v > 0; };
  if (!positive(vocab_size) || !positive(hidden_size) || !positive(intermediate_size) ||
      !positive(num_layers) || !positive(num_heads) || !positive(num_kv_heads) ||
      !positive(head_dim)) {
    return InvalidArgument(
        "vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, "
        "num_key_value_heads and head_dim must all be positive");
  }
  if (num_heads % num_kv_heads != 0) {
    return InvalidArgument("num_attention_heads (" + std::to_string(num_heads) +
                           ") is not a multiple of num_key_value_heads (" +
                           std::to_string(num_kv_heads) + ")");
  }
  if (head_dim % 2 != 0) {
    return InvalidArgument("head_dim (" + std::to_string(head_dim) + ") must be even for RoPE");
  }
  if (head_dim * num_heads > (int64_t{1} << 20) || hidden_size > (int64_t{1} << 20) ||
      vocab_size > (int64_t{1} << 24) || intermediate_size > (int64_t{1} << 22) ||
      num_layers > 4096) {
    return InvalidArgument("model dimensions are implausibly large");
  }
  if (!(query_pre_attn_scalar > 0) || !std::isfinite(query_pre_attn_scalar)) {
    return InvalidArgument("query_pre_attn_scalar must be positive");
  }
  if (!(rms_norm_eps > 0) || !(rope_theta > 0) || sliding_window < 0 || attn_logit_softcap < 0 ||
      final_logit_softcap < 0 || max_position_embeddings <= 0) {
    return InvalidArgument(
        "rms_norm_eps and rope_theta must be positive; sliding_window and softcaps non-negative");
  }
  if (static_cast<int64_t>(layer_is_sliding.size()) != num_layers) {
    return InvalidArgument("layer_types must have one entry per layer");
  }
  if (bos_token_id < 0 || bos_token_id >= vocab_size || pad_token_id < 0 ||
      pad_token_id >= vocab_size) {
    return InvalidArgument("bos_token_id and pad_token_id must be inside the vocabulary");
  }
  if (is_classifier() && num_labels <= 0) return InvalidArgument("num_labels must be positive");
  return OkStatus();
}

Result<ModelConfig> ParseModelConfig(std::string_view json_text, const std::string& source) {
  if (!JsonNestingWithin(json_text, kMaxPeerJsonDepth))
    return InvalidArgument(source + ": JSON nested deeper than " +
                           std::to_string(kMaxPeerJsonDepth) + " levels");
  json j = json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return InvalidArgument(source + ": not valid JSON");
  if (!j.is_object()) return InvalidArgument(source + ": expected a JSON object");
  if (auto mt = j.find("model_type");
      mt != j.end() && mt->is_string() && mt->get<std::string>() != "gemma2") {
    return Unimplemented(source + ": model_type '" + mt->get<std::string>() + "' is not gemma2");
  }
  ModelConfig c;
  RETURN_IF_ERROR(ParseArchitecture(j, source, &c.architecture));
  RETURN_IF_ERROR(ParseActivation(j, source));
  RETURN_IF_ERROR(GetInt(j, source, "vocab_size", true, &c.vocab_size));
  RETURN_IF_ERROR(GetInt(j, source, "hidden_size", true, &c.hidden_size));
  RETURN_IF_ERROR(GetInt(j, source, "intermediate_size", true, &c.intermediate_size));
  RETURN_IF_ERROR(GetInt(j, source, "num_hidden_layers", true, &c.num_layers));
  RETURN_IF_ERROR(GetInt(j, source, "num_attention_heads", true, &c.num_heads));
  c.num_kv_heads = c.num_heads;
  RETURN_IF_ERROR(GetInt(j, source, "num_key_value_heads", false, &c.num_kv_heads));
  if (auto hd = j.find("head_dim"); hd == j.end() || hd->is_null()) {
    // transformers' default head_dim is hidden_size / num_attention_heads: it must divide.
    if (c.num_heads <= 0 || c.hidden_size % c.num_heads != 0) {
      return FieldError(source, "head_dim",
                        "is missing and hidden_size (" + std::to_string(c.hidden_size) +
                            ") is not a multiple of num_attention_heads (" +
                            std::to_string(c.num_heads) + ")");
    }
    c.head_dim = c.hidden_size / c.num_heads;
  }
  RETURN_IF_ERROR(GetInt(j, source, "head_dim", false, &c.head_dim));
  RETURN_IF_ERROR(GetInt(j, source, "max_position_embeddings", false, &c.max_position_embeddings));
  RETURN_IF_ERROR(GetDouble(j, source, "rms_norm_eps", false, &c.rms_norm_eps));
  RETURN_IF_ERROR(ParseRope(j, source, &c.rope_theta));
  c.query_pre_attn_scalar = static_cast<double>(c.head_dim);
  RETURN_IF_ERROR(GetDouble(j, source, "query_pre_attn_scalar", false, &c.query_pre_attn_scalar));
  RETURN_IF_ERROR(GetInt(j, source, "sliding_window", false, &c.sliding_window));
  // A null softcap means "none"; absent means transformers' default.
  c.attn_logit_softcap = 50.0;
  c.final_logit_softcap = 30.0;
  for (auto [key, dst] : {std::pair{"attn_logit_softcapping", &c.attn_logit_softcap},
                          std::pair{"final_logit_softcapping", &c.final_logit_softcap}}) {
    auto it = j.find(key);
    if (it != j.end() && it->is_null()) *dst = 0;
    RETURN_IF_ERROR(GetDouble(j, source, key, false, dst));
  }
  if (auto ab = j.find("attention_bias"); ab != j.end() && ab->is_boolean() && ab->get<bool>()) {
    return Unimplemented(source + ": attention_bias=true is not supported (Gemma 2 has none)");
  }
  if (auto tie = j.find("tie_word_embeddings"); tie != j.end() && tie->is_boolean()) {
    c.tie_word_embeddings = tie->get<bool>();
  }
  RETURN_IF_ERROR(GetInt(j, source, "bos_token_id", false, &c.bos_token_id));
  RETURN_IF_ERROR(GetInt(j, source, "pad_token_id", false, &c.pad_token_id));
  if (auto eos = j.find("eos_token_id"); eos != j.end() && !eos->is_null()) {
    c.eos_token_ids.clear();
    if (eos->is_number_integer()) {
      c.eos_token_ids.push_back(eos->get<int64_t>());
    } else if (eos->is_array()) {
      for (const auto& e : *eos) {
        if (!e.is_number_integer()) return FieldError(source, "eos_token_id", "must be integers");
        c.eos_token_ids.push_back(e.get<int64_t>());
      }
    } else {
      return FieldError(source, "eos_token_id", "must be an integer or a list of integers");
    }
  }
  for (const char* key : {"dtype", "torch_dtype"}) {
    if (auto d = j.find(key); d != j.end() && d->is_string()) {
      c.torch_dtype = d->get<std::string>();
      break;
    }
  }
  RETURN_IF_ERROR(GetInt(j, source, "num_hidden_layers", true, &c.num_layers));
  if (c.num_layers <= 0 || c.num_layers > 4096) {
    return FieldError(source, "num_hidden_layers", "must be between 1 and 4096");
  }
  RETURN_IF_ERROR(ParseLayerTypes(j, source, &c));
  if (c.is_classifier()) RETURN_IF_ERROR(ParseLabels(j, source, &c));
  RETURN_IF_ERROR(c.Validate().WithContext(source));
  return c;
}

Result<ModelConfig> LoadModelConfig(const std::filesystem::path& config_json) {
  std::ifstream in(config_json, std::ios::binary);
  if (!in) return NotFound(config_json.string() + ": cannot open");
  std::stringstream ss;
  ss << in.rdbuf();
  return ParseModelConfig(ss.str(), config_json.string());
}

Result<ModelConfig> PresetConfig(std::string_view name) {
  ModelConfig c;
  c.vocab_size = 256000;
  c.max_position_embeddings = 8192;
  c.sliding_window = 4096;
  c.attn_logit_softcap = 50.0;
  c.final_logit_softcap = 30.0;
  c.torch_dtype = "bfloat16";
  if (name == "2b") {
    c.hidden_size = 2304;
    c.num_layers = 26;
    c.num_heads = 8;
    c.num_kv_heads = 4;
    c.head_dim = 256;
    c.intermediate_size = 9216;     // 4 * 2304
    c.query_pre_attn_scalar = 256;  // = head_dim
  } else if (name == "9b") {
    c.hidden_size = 3584;
    c.num_layers = 42;
    c.num_heads = 16;
    c.num_kv_heads = 8;
    c.head_dim = 256;
    c.intermediate_size = 14336;    // 4 * 3584
    c.query_pre_attn_scalar = 256;  // = head_dim
  } else if (name == "27b") {
    c.hidden_size = 4608;
    c.num_layers = 46;
    c.num_heads = 32;
    c.num_kv_heads = 16;
    c.head_dim = 128;
    c.intermediate_size = 36864;    // 8 * 4608
    c.query_pre_attn_scalar = 144;  // = 4608 / 32, not head_dim
  } else {
    return InvalidArgument("unknown preset '" + std::string(name) + "' (use 2b, 9b or 27b)");
  }
  for (int64_t i = 0; i < c.num_layers; ++i) c.layer_is_sliding.push_back(i % 2 == 0);
  RETURN_IF_ERROR(c.Validate());
  return c;
}

std::string ModelConfigToJson(const ModelConfig& c) {
  json j;
  j["architectures"] = {std::string(ArchitectureName(c.architecture))};
  j["model_type"] = "gemma2";
  j["vocab_size"] = c.vocab_size;
  j["hidden_size"] = c.hidden_size;
  j["intermediate_size"] = c.intermediate_size;
  j["num_hidden_layers"] = c.num_layers;
  j["num_attention_heads"] = c.num_heads;
  j["num_key_value_heads"] = c.num_kv_heads;
  j["head_dim"] = c.head_dim;
  j["hidden_activation"] = "gelu_pytorch_tanh";
  j["max_position_embeddings"] = c.max_position_embeddings;
  j["rms_norm_eps"] = c.rms_norm_eps;
  j["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", c.rope_theta}};
  j["query_pre_attn_scalar"] = c.query_pre_attn_scalar;
  j["sliding_window"] = c.sliding_window;
  j["attn_logit_softcapping"] = c.attn_logit_softcap > 0 ? json(c.attn_logit_softcap) : json();
  j["final_logit_softcapping"] = c.final_logit_softcap > 0 ? json(c.final_logit_softcap) : json();
  json types = json::array();
  for (bool s : c.layer_is_sliding) types.push_back(s ? "sliding_attention" : "full_attention");
  j["layer_types"] = types;
  j["tie_word_embeddings"] = c.tie_word_embeddings;
  j["bos_token_id"] = c.bos_token_id;
  j["pad_token_id"] = c.pad_token_id;
  j["eos_token_id"] =
      c.eos_token_ids.size() == 1 ? json(c.eos_token_ids[0]) : json(c.eos_token_ids);
  j["dtype"] = c.torch_dtype.empty() ? "bfloat16" : c.torch_dtype;
  if (c.is_classifier()) {
    j["num_labels"] = c.num_labels;
    json labels = json::object();
    for (size_t i = 0; i < c.id2label.size(); ++i) labels[std::to_string(i)] = c.id2label[i];
    j["id2label"] = labels;
  }
  return j.dump(2) + "\n";
}

}  // namespace gemma2
