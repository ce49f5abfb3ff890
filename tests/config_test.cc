#include "model/config.h"

#include <gtest/gtest.h>

#include <fstream>
#include <sstream>

#include "common/json_depth.h"

namespace gemma2 {
namespace {

// google/gemma-2-2b's config.json as published (the older dialect).
constexpr const char* kPublished2b = R"({
  "architectures": ["Gemma2ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid",
  "eos_token_id": [1, 107], "final_logit_softcapping": 30.0, "head_dim": 256,
  "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304,
  "initializer_range": 0.02, "intermediate_size": 9216, "max_position_embeddings": 8192,
  "model_type": "gemma2", "num_attention_heads": 8, "num_hidden_layers": 26,
  "num_key_value_heads": 4, "pad_token_id": 0, "query_pre_attn_scalar": 256,
  "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096,
  "torch_dtype": "float32", "transformers_version": "4.42.4", "use_cache": true, "vocab_size": 256000})";

TEST(ConfigTest, ParsesPublishedDialect) {
  auto c = ParseModelConfig(kPublished2b, "2b");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->architecture, Architecture::kCausalLM);
  EXPECT_EQ(c->hidden_size, 2304);
  EXPECT_EQ(c->head_dim, 256);
  EXPECT_EQ(c->num_kv_heads, 4);
  EXPECT_DOUBLE_EQ(c->query_pre_attn_scalar, 256);
  EXPECT_EQ(c->eos_token_ids, (std::vector<int64_t>{1, 107}));
  ASSERT_EQ(c->layer_is_sliding.size(), 26u);
  EXPECT_TRUE(c->layer_is_sliding[0]);  // default: even layers slide
  EXPECT_FALSE(c->layer_is_sliding[1]);
  EXPECT_EQ(c->torch_dtype, "float32");
}

TEST(ConfigTest, ParsesNewDialectAndClassifierLabels) {
  const char* text =
      R"({"architectures": ["Gemma2ForSequenceClassification"], "model_type": "gemma2",
    "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
    "rope_parameters": {"rope_type": "default", "rope_theta": 5000.0},
    "layer_types": ["full_attention", "sliding_attention", "full_attention"],
    "dtype": "bfloat16", "id2label": {"0": "neg", "1": "pos"}, "final_logit_softcapping": null})";
  auto c = ParseModelConfig(text, "new");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->architecture, Architecture::kSequenceClassification);
  EXPECT_DOUBLE_EQ(c->rope_theta, 5000.0);
  EXPECT_EQ(c->layer_is_sliding, (std::vector<bool>{false, true, false}));
  EXPECT_EQ(c->torch_dtype, "bfloat16");
  EXPECT_EQ(c->num_labels, 2);
  EXPECT_EQ(c->id2label, (std::vector<std::string>{"neg", "pos"}));
  EXPECT_EQ(c->final_logit_softcap, 0);
  EXPECT_DOUBLE_EQ(c->query_pre_attn_scalar, 8);  // defaults to head_dim
}

TEST(ConfigTest, PresetsMatchPublishedShapesAndFiles) {
  for (const char* name : {"2b", "9b", "27b"}) {
    auto p = PresetConfig(name);
    ASSERT_TRUE(p.ok());
    std::ifstream in(std::string(GEMMA2_SOURCE_DIR) + "/configs/gemma-2-" + name + ".json");
    ASSERT_TRUE(in) << name;
    std::stringstream ss;
    ss << in.rdbuf();
    auto f = ParseModelConfig(ss.str(), name);
    ASSERT_TRUE(f.ok()) << f.status().ToString();
    EXPECT_EQ(f->hidden_size, p->hidden_size) << name;
    EXPECT_EQ(f->num_layers, p->num_layers) << name;
    EXPECT_EQ(f->num_heads, p->num_heads) << name;
    EXPECT_EQ(f->num_kv_heads, p->num_kv_heads) << name;
    EXPECT_EQ(f->head_dim, p->head_dim) << name;
    EXPECT_EQ(f->intermediate_size, p->intermediate_size) << name;
    EXPECT_DOUBLE_EQ(f->query_pre_attn_scalar, p->query_pre_attn_scalar) << name;
    EXPECT_EQ(f->layer_is_sliding, p->layer_is_sliding) << name;
  }
  EXPECT_DOUBLE_EQ(PresetConfig("27b")->query_pre_attn_scalar, 144);
  EXPECT_FALSE(PresetConfig("7b").ok());
}

TEST(ConfigTest, RoundTripsThroughOurWriter) {
  auto p = PresetConfig("9b");
  auto back = ParseModelConfig(ModelConfigToJson(*p), "roundtrip");
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(back->intermediate_size, 14336);
  EXPECT_EQ(back->layer_is_sliding, p->layer_is_sliding);
}

struct BadConfig {
  const char* what;
  std::string edit_from, edit_to;  // replace in the published 2B text
  std::string expect;              // a fragment of the error message
};

TEST(ConfigTest, RejectsBadConfigsWithClearErrors) {
  const std::vector<BadConfig> cases = {
      {"unknown architecture", "Gemma2ForCausalLM", "LlamaForCausalLM",
       "unknown architecture 'LlamaForCausalLM'"},
      {"unsupported activation", R"("hidden_activation": "gelu_pytorch_tanh")",
       R"("hidden_activation": "relu")", "unsupported activation"},
      {"missing field", R"("hidden_size": 2304,)", "", "'hidden_size' is missing"},
      {"kv not dividing heads", R"("num_key_value_heads": 4)", R"("num_key_value_heads": 3)",
       "not a multiple of num_key_value_heads"},
      {"wrong type", R"("num_hidden_layers": 26)", R"("num_hidden_layers": "26")",
       "must be an integer"},
      {"layer_types length", R"("rope_theta")",
       R"("layer_types": ["full_attention"], "rope_theta")", "has 1 entries"},
      {"odd head_dim", R"("head_dim": 256)", R"("head_dim": 255)", "must be even"},
      {"head_dim missing, not dividing", R"("head_dim": 256,)", "",
       "not a multiple of num_attention_heads"},
      {"model type", R"("model_type": "gemma2")", R"("model_type": "gemma3")", "is not gemma2"},
      {"rope scaling", R"("rope_theta": 10000.0)", R"("rope_parameters": {"rope_type": "yarn"})",
       "rope_type 'yarn'"},
  };
  for (const auto& bc : cases) {
    std::string text = kPublished2b;
    const auto pos = text.find(bc.edit_from);
    ASSERT_NE(pos, std::string::npos) << bc.what;
    text.replace(pos, bc.edit_from.size(), bc.edit_to);
    if (std::string(bc.what) == "head_dim missing, not dividing") {
      text.replace(text.find("\"hidden_size\": 2304"), 19, "\"hidden_size\": 2300");
    }
    auto c = ParseModelConfig(text, "cfg.json");
    ASSERT_FALSE(c.ok()) << bc.what;
    EXPECT_NE(c.status().message().find(bc.expect), std::string::npos)
        << bc.what << ": " << c.status().message();
    EXPECT_NE(c.status().message().find("cfg.json"), std::string::npos) << bc.what;
  }
  EXPECT_FALSE(ParseModelConfig("{not json", "x").ok());
  EXPECT_FALSE(ParseModelConfig("[1,2]", "x").ok());
}

// A config.json nested past the bound is refused by name before it is parsed
// (common/json_depth.h); strings full of brackets do not count.
TEST(ConfigTest, DeeplyNestedConfigIsRefusedByName) {
  const std::string deep = "{\"x\": " + std::string(100000, '[') + std::string(100000, ']') + "}";
  auto c = ParseModelConfig(deep, "deep.json");
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("deep.json: JSON nested deeper than"), std::string::npos)
      << c.status().ToString();
  EXPECT_TRUE(JsonNestingWithin("{\"a\": \"[[[[[[[[[[\\\"[[[[\"}", 1));
  EXPECT_FALSE(JsonNestingWithin("[[]]", 1));
}

}  // namespace
}  // namespace gemma2
