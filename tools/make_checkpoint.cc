// gemma2-make-checkpoint: writes a deterministic random-weight Gemma 2 checkpoint in Hugging Face
// format, optionally with a small sentencepiece tokenizer trained on a text corpus. The demo's
// model and many tests come from here; `--preset` gives the published shapes (random weights).
#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <CLI/CLI.hpp>
#include <cmath>
#include <filesystem>
#include <iostream>

#include "model/random_checkpoint.h"
#include "cli/run_tool.h"

namespace gemma2 {
namespace {

struct Args {
  std::string out, corpus, preset, arch = "causal", dtype = "bf16";
  uint64_t seed = 0;
  int64_t vocab = 512, hidden = 64, layers = 4, heads = 4, kv_heads = 2, head_dim = 16;
  int64_t intermediate = 128, window = 32, labels = 3, max_positions = 8192;
  int shards = 1;
  std::string fp8 = "none";  // none, block (transformers), channel or tensor (compressed-tensors)
  int64_t fp8_block = 128;
  // Defaults for which greedy output follows the prompt: with a unit-scale embedding the tied
  // head's largest logit is the current token's own row, and every prompt repeats its last token.
  float weight_std = 0;  // 0: 2.4 / sqrt(hidden) (0.3 at the default hidden 64)
  float embed_std = 0.02f;
};

// Trains a byte-fallback BPE tokenizer with Gemma's special ids; returns its vocabulary size.
Result<int64_t> TrainTokenizer(const std::string& corpus, const std::filesystem::path& dir,
                               int64_t vocab) {
  const std::string prefix = (dir / "tokenizer").string();
  const std::string flags =
      "--input=" + corpus + " --model_prefix=" + prefix + " --vocab_size=" + std::to_string(vocab) +
      " --model_type=bpe --byte_fallback=true --hard_vocab_limit=false --num_threads=1"
      " --pad_id=0 --eos_id=1 --bos_id=2 --unk_id=3 --pad_piece=<pad> --eos_piece=<eos>"
      " --bos_piece=<bos> --unk_piece=<unk> --user_defined_symbols=<start_of_turn>,<end_of_turn>"
      " --split_digits=true --add_dummy_prefix=false --shuffle_input_sentence=false"
      " --character_coverage=1.0 --minloglevel=2";
  const auto st = sentencepiece::SentencePieceTrainer::Train(flags);
  if (!st.ok()) return Internal("training the tokenizer failed: " + st.ToString());
  std::filesystem::remove(prefix + ".vocab");
  sentencepiece::SentencePieceProcessor sp;
  if (!sp.Load(prefix + ".model").ok()) return Internal("cannot reload the trained tokenizer");
  return static_cast<int64_t>(sp.GetPieceSize());
}

Status Run(const Args& a) {
  ModelConfig c;
  if (!a.preset.empty()) {
    ASSIGN_OR_RETURN(c, PresetConfig(a.preset));
  } else {
    c.vocab_size = a.vocab;
    c.hidden_size = a.hidden;
    c.num_layers = a.layers;
    c.num_heads = a.heads;
    c.num_kv_heads = a.kv_heads;
    c.head_dim = a.head_dim;
    c.intermediate_size = a.intermediate;
    c.sliding_window = a.window;
    c.query_pre_attn_scalar = static_cast<double>(a.head_dim);
    c.max_position_embeddings = a.max_positions;
    c.attn_logit_softcap = 50;
    c.final_logit_softcap = 30;
    c.torch_dtype = a.dtype == "f32" ? "float32" : (a.dtype == "f16" ? "float16" : "bfloat16");
    for (int64_t i = 0; i < c.num_layers; ++i) c.layer_is_sliding.push_back(i % 2 == 0);
  }
  if (a.arch == "seqcls" || a.arch == "tokcls") {
    c.architecture = a.arch == "seqcls" ? Architecture::kSequenceClassification
                                        : Architecture::kTokenClassification;
    c.num_labels = a.labels;
    for (int64_t i = 0; i < a.labels; ++i) c.id2label.push_back("LABEL_" + std::to_string(i));
  } else if (a.arch != "causal") {
    return InvalidArgument("--arch must be causal, seqcls or tokcls");
  }
  RandomCheckpointOptions o;
  o.seed = a.seed;
  o.shards = a.shards;
  o.weight_std = a.weight_std > 0 ? a.weight_std
                                  : 2.4f / std::sqrt(static_cast<float>(c.hidden_size));
  o.embed_std = a.embed_std;
  if (a.dtype == "f32")
    o.dtype = DType::kF32;
  else if (a.dtype == "f16")
    o.dtype = DType::kF16;
  else if (a.dtype != "bf16")
    return InvalidArgument("--dtype must be bf16, f16 or f32");
  if (a.fp8 == "block") {
    o.fp8.kind = Fp8Scheme::Kind::kBlock;
    o.fp8.block_rows = o.fp8.block_cols = a.fp8_block;
  } else if (a.fp8 == "channel") {
    o.fp8.kind = Fp8Scheme::Kind::kChannel;
  } else if (a.fp8 == "tensor") {
    o.fp8.kind = Fp8Scheme::Kind::kTensor;
  }
  std::filesystem::create_directories(a.out);
  if (!a.corpus.empty()) {
    ASSIGN_OR_RETURN(c.vocab_size, TrainTokenizer(a.corpus, a.out, a.vocab));
  }
  RETURN_IF_ERROR(WriteRandomCheckpoint(c, a.out, o));
  std::cerr << "gemma2-make-checkpoint: wrote " << a.out << " (vocab " << c.vocab_size
            << ", hidden " << c.hidden_size << ", " << c.num_layers << " layers, seed " << a.seed
            << ")\n";
  return OkStatus();
}

}  // namespace
}  // namespace gemma2

int main(int argc, char** argv) {
  gemma2::Args a;
  CLI::App app{"gemma2-make-checkpoint: a random-weight Gemma 2 checkpoint in Hugging Face format"};
  app.add_option("--out", a.out, "output directory")->required();
  app.add_option("--seed", a.seed, "weight seed");
  app.add_option("--corpus", a.corpus,
                 "train tokenizer.model on this text file (sets the vocabulary)");
  app.add_option("--preset", a.preset, "published shapes: 2b, 9b, 27b");
  app.add_option("--arch", a.arch, "causal, seqcls or tokcls");
  app.add_option("--dtype", a.dtype, "bf16, f16 or f32");
  app.add_option("--vocab", a.vocab, "vocabulary size (tokenizer: target size)");
  app.add_option("--hidden", a.hidden);
  app.add_option("--layers", a.layers);
  app.add_option("--heads", a.heads);
  app.add_option("--kv-heads", a.kv_heads);
  app.add_option("--head-dim", a.head_dim);
  app.add_option("--intermediate", a.intermediate);
  app.add_option("--window", a.window, "sliding window");
  app.add_option("--labels", a.labels, "classifier labels");
  app.add_option("--shards", a.shards, "safetensors shards");
  app.add_option("--weight-std", a.weight_std,
                 "stddev of projection weights (0: 2.4 / sqrt(hidden))");
  app.add_option("--embed-std", a.embed_std, "stddev of the embedding");
  app.add_option("--fp8", a.fp8,
                 "store the projections in FP8 as published checkpoints do: block (transformers' "
                 "fp8, block scales), channel or tensor (compressed-tensors float-quantized)")
      ->check(CLI::IsMember({"none", "block", "channel", "tensor"}));
  app.add_option("--fp8-block", a.fp8_block, "rows and columns of a --fp8 block scale")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 20));
  return gemma2::RunTool("gemma2-make-checkpoint", app, argc, argv, [&] { return gemma2::Run(a); });
}
