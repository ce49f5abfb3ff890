// gemma2-run: the offline runner. Loads a checkpoint, runs one prompt (or a file of prompts) and
// prints one JSON object per prompt. Every bad input ends in one line on stderr and exit 1.
#include <CLI/CLI.hpp>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>

#include "coordinator/cluster.h"
#include "engine/engine.h"
#include "engine/generate.h"
#include "model/tokenizer.h"
#include "model/weight_source.h"
#include "cli/options.h"
#include "cli/run_tool.h"

namespace gemma2 {
namespace {

using nlohmann::json;

struct Args {
  std::string model, backend = "cpu", prompt_ids, prompts_file, format = "json";
  std::string quantization = "auto", kv_cache_dtype = "auto";
  std::optional<std::string> prompt;
  int tp = 1, threads = 0;
  int64_t max_new_tokens = 16;
  bool greedy = false, logits = false, chat = false, ignore_eos = false;
  std::optional<float> temperature, top_p;
  std::optional<int64_t> top_k;
  std::optional<uint64_t> seed;
  std::optional<uint64_t> random_weights;
  std::string preset;
  int64_t layers = 0;
  double kv_cache_gb = 0;
  bool progress = false;
  std::string launch = "none";
  int pp = 1;
  std::string listen = "127.0.0.1";
  std::vector<std::string> node_exec, node_address;
  ClusterTimeouts timeouts;  // with --launch local
};

// The weights: a checkpoint directory, or deterministic random weights of a preset's shape.
Result<std::unique_ptr<WeightSource>> OpenWeights(const Args& a, std::unique_ptr<Checkpoint>* ck) {
  if (a.random_weights) {
    if (!a.model.empty()) return InvalidArgument("give --model or --random-weights, not both");
    if (a.preset.empty()) return InvalidArgument("--random-weights needs --preset 2b|9b|27b");
    ASSIGN_OR_RETURN(ModelConfig c, PresetConfig(a.preset));
    if (a.layers > 0) {
      if (a.layers > c.num_layers) return InvalidArgument("--layers exceeds the preset's layers");
      c.num_layers = a.layers;
      c.layer_is_sliding.resize(static_cast<size_t>(a.layers));
    }
    return std::unique_ptr<WeightSource>(std::make_unique<RandomWeights>(c, *a.random_weights));
  }
  if (a.model.empty())
    return InvalidArgument("give --model DIR (or --random-weights SEED --preset NAME)");
  if (a.model.rfind("random:", 0) == 0)
    return OpenWeightSource(a.model);  // random:SHAPE:SEED[:LAYERS]
  if (!a.preset.empty() || a.layers > 0) {
    return InvalidArgument("--preset and --layers go with --random-weights");
  }
  ASSIGN_OR_RETURN(*ck, Checkpoint::Open(a.model));
  return std::unique_ptr<WeightSource>();
}

Result<std::vector<int32_t>> ParseIds(const std::string& text) {
  std::vector<int32_t> ids;
  size_t pos = 0;
  while (pos <= text.size()) {
    const size_t comma = text.find(',', pos);
    const std::string item =
        text.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
    size_t used = 0;
    long long v = 0;
    try {
      v = std::stoll(item, &used);
    } catch (...) {
      used = 0;
    }
    if (used == 0 || used != item.size()) {
      return InvalidArgument("--prompt-ids: '" + item + "' is not an integer token id");
    }
    if (v < INT32_MIN || v > INT32_MAX)
      return InvalidArgument("--prompt-ids: " + item + " is out of range");
    ids.push_back(static_cast<int32_t>(v));
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  return ids;
}

Result<SamplingParams> MakeSampling(const Args& a) {
  SamplingParams s;
  const bool any = a.temperature || a.top_k || a.top_p || a.seed;
  if (a.greedy && any) return InvalidArgument("--greedy cannot be combined with sampling flags");
  s.greedy = !any;
  if (a.temperature) s.temperature = *a.temperature;
  if (a.temperature && s.temperature > 0 && SamplesGreedily(s.temperature)) s.greedy = true;
  if (a.top_k) s.top_k = *a.top_k;
  if (a.top_p) s.top_p = *a.top_p;
  if (a.seed) s.seed = *a.seed;
  RETURN_IF_ERROR(s.Validate());
  return s;
}

// The prompts to run, as token ids.
Result<std::vector<std::vector<int32_t>>> Prompts(const Args& a, const Tokenizer* tok) {
  std::vector<std::string> texts;
  std::vector<std::vector<int32_t>> out;
  const int given =
      (a.prompt ? 1 : 0) + (!a.prompt_ids.empty() ? 1 : 0) + (!a.prompts_file.empty() ? 1 : 0);
  if (given != 1)
    return InvalidArgument("give exactly one of --prompt, --prompt-ids, --prompts-file");
  if (!a.prompt_ids.empty()) {
    ASSIGN_OR_RETURN(auto ids, ParseIds(a.prompt_ids));
    out.push_back(std::move(ids));
    return out;
  }
  if (a.prompt) {
    texts.push_back(*a.prompt);
  } else {
    std::ifstream in(a.prompts_file);
    if (!in) return NotFound(a.prompts_file + ": cannot open");
    for (std::string line; std::getline(in, line);) {
      if (!line.empty()) texts.push_back(line);
    }
    if (texts.empty()) return InvalidArgument(a.prompts_file + ": no prompts");
  }
  if (!tok) {
    return InvalidArgument(
        "the checkpoint has no tokenizer.model: give token ids with --prompt-ids");
  }
  for (const auto& t : texts) {
    if (t.empty()) return InvalidArgument("empty prompt");
    if (a.chat) {
      ASSIGN_OR_RETURN(auto ids, tok->EncodeChat({{"user", t}}));
      out.push_back(std::move(ids));
    } else {
      ASSIGN_OR_RETURN(auto ids, tok->Encode(t));
      out.push_back(std::move(ids));
    }
  }
  return out;
}

Status Run(const Args& a) {
  std::unique_ptr<Checkpoint> ck;
  ASSIGN_OR_RETURN(auto random, OpenWeights(a, &ck));
  const WeightSource& weights = ck ? static_cast<const WeightSource&>(*ck) : *random;
  std::unique_ptr<Tokenizer> tok;
  if (ck) {
    if (auto p = ck->tokenizer_path(); !p.empty()) {
      ASSIGN_OR_RETURN(tok, Tokenizer::Load(p));
    }
  }
  ASSIGN_OR_RETURN(auto prompts, Prompts(a, tok.get()));
  for (const auto& p : prompts) {
    if (p.empty()) return InvalidArgument("empty prompt");
  }
  EngineOptions eo;
  eo.backend.name = a.backend;
  ASSIGN_OR_RETURN(eo.quantization, ResolveQuantization(a.quantization, a.model));
  ASSIGN_OR_RETURN(eo.kv_cache_dtype, ParseKvCacheDtype(a.kv_cache_dtype));
  eo.tp = a.tp;
  eo.threads = a.threads;
  eo.backend.kv_cache_bytes = static_cast<int64_t>(a.kv_cache_gb * (1 << 30));
  if (a.progress) eo.progress = StderrLoadProgress("gemma2-run");
  std::unique_ptr<StepExecutor> engine;
  if (a.launch == "local") {
    // The same request through a real local cluster: one worker process per rank.
    ClusterOptions co;
    // Workers read the checkpoint, or make the same random weights from the spec.
    co.model =
        a.random_weights ? RandomWeightsSpec(a.preset, *a.random_weights, a.layers) : a.model;
    co.tp = a.tp;
    co.pp = a.pp;
    co.listen_host = a.listen;
    if (a.node_exec.size() != a.node_address.size()) {
      return InvalidArgument("give one --node-address per --node-exec");
    }
    for (size_t i = 0; i < a.node_exec.size(); ++i) {
      ClusterOptions::Node n;
      std::stringstream words(a.node_exec[i]);
      for (std::string w; words >> w;) n.exec_prefix.push_back(w);
      n.address = a.node_address[i];
      co.nodes.push_back(n);
    }
    co.backend = a.backend;
    co.quantization = a.quantization;
    co.kv_cache_dtype = a.kv_cache_dtype;
    co.timeouts = a.timeouts;
    if (const char* r = std::getenv("GEMMA2_FAULT_WRONG_SECRET_RANK"))
      co.wrong_secret_rank = std::atoi(r);
    ASSIGN_OR_RETURN(engine, ClusterEngine::LaunchLocal(co));
  } else {
    if (a.pp != 1)
      return InvalidArgument("--pp needs --launch local (pipeline stages are processes)");
    ASSIGN_OR_RETURN(engine, Engine::Create(weights, eo));
  }
  const ModelConfig& c = engine->config();

  if (c.is_classifier()) {
    for (const auto& p : prompts) {
      ASSIGN_OR_RETURN(auto res, Classify(*engine, p));
      json j;
      j["prompt_ids"] = p;
      j["logits"] = res.logits;
      j["labels"] = res.labels;
      std::cout << j.dump() << "\n";
    }
    return OkStatus();
  }
  ASSIGN_OR_RETURN(auto sampling, MakeSampling(a));
  std::vector<GenerationRequest> reqs;
  for (const auto& p : prompts) {
    GenerationRequest r;
    r.prompt = p;
    r.max_new_tokens = a.max_new_tokens;
    r.sampling = sampling;
    r.ignore_eos = a.ignore_eos;
    r.return_logits = a.logits;
    reqs.push_back(std::move(r));
  }
  ASSIGN_OR_RETURN(auto results, Generate(*engine, reqs));
  if (a.format == "text") {
    for (size_t i = 0; i < results.size(); ++i) {
      std::string prompt_text = "(token ids)", completion = "(token ids)";
      if (tok) {
        ASSIGN_OR_RETURN(prompt_text, tok->Decode(reqs[i].prompt));
        ASSIGN_OR_RETURN(completion, tok->Decode(results[i].generated));
      }
      std::cout << "[" << i << "] " << prompt_text << "\n    -> " << completion << "\n    ("
                << reqs[i].prompt.size() << " prompt tokens, " << results[i].generated.size()
                << " generated, finish: " << results[i].finish_reason << ")\n";
    }
    return OkStatus();
  }
  for (size_t i = 0; i < results.size(); ++i) {
    json j;
    j["prompt_ids"] = reqs[i].prompt;
    j["generated_ids"] = results[i].generated;
    if (tok) {
      ASSIGN_OR_RETURN(auto text, tok->Decode(results[i].generated));
      j["text"] = text;
    } else {
      j["text"] = nullptr;
    }
    j["finish_reason"] = results[i].finish_reason;
    if (a.logits) j["logits"] = results[i].logits;
    std::cout << j.dump() << "\n";
  }
  return OkStatus();
}

}  // namespace
}  // namespace gemma2

int main(int argc, char** argv) {
  gemma2::Args a;
  CLI::App app{"gemma2-run: run Gemma 2 prompts through one engine and print JSON"};
  gemma2::cli::AddModel(app, a.model);
  app.add_option("--random-weights", a.random_weights,
                 "deterministic random weights (seed) instead of --model");
  app.add_option("--preset", a.preset, "with --random-weights: 2b, 9b or 27b");
  app.add_option("--layers", a.layers,
                 "with --random-weights: keep the first N layers (widths exact)");
  gemma2::cli::AddBackend(app, a.backend);
  gemma2::cli::AddQuantization(app, a.quantization);
  gemma2::cli::AddKvCacheDtype(app, a.kv_cache_dtype);
  app.add_option("--kv-cache-gb", a.kv_cache_gb, "cuda: KV cache size (0: 90% of free memory)");
  gemma2::cli::AddTp(app, a.tp, "threads in this process, or worker processes with --launch local");
  app.add_option("--threads", a.threads, "math threads (0: all cores)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--prompt", a.prompt, "prompt text (needs tokenizer.model)");
  app.add_option("--prompt-ids", a.prompt_ids, "comma-separated token ids, e.g. 2,5,9");
  app.add_option("--prompts-file", a.prompts_file, "one prompt per line; one JSON line each");
  app.add_flag("--chat", a.chat, "wrap text prompts in Gemma's chat template");
  app.add_option("--max-new-tokens", a.max_new_tokens, "tokens to generate")
      ->check(CLI::Range(int64_t{0}, int64_t{1} << 20));
  app.add_flag("--greedy", a.greedy, "argmax decoding (the default without sampling flags)");
  app.add_option("--temperature", a.temperature, "sampling temperature > 0");
  app.add_option("--top-k", a.top_k, "keep the k most likely tokens (0: off)");
  app.add_option("--top-p", a.top_p, "nucleus sampling mass in (0, 1]");
  app.add_option("--seed", a.seed, "sampling seed");
  app.add_flag("--logits", a.logits, "print the logits rows");
  app.add_option("--format", a.format, "json (one object per prompt) or text (for people)")
      ->check(CLI::IsMember({"json", "text"}));
  app.add_flag("--ignore-eos", a.ignore_eos, "do not stop at end-of-sequence tokens");
  app.add_flag("--progress", a.progress, "show weight loading progress on stderr");
  app.add_option("--launch", a.launch,
                 "none (one process) or local (coordinator + a worker per rank)")
      ->check(CLI::IsMember({"none", "local"}));
  gemma2::cli::AddClusterTimeouts(app, a.timeouts);
  gemma2::cli::AddPp(app, a.pp, "with --launch local");
  app.add_option("--listen", a.listen, "cluster: the coordinator's control-plane address");
  app.add_option(
      "--node-exec", a.node_exec,
      "cluster: per node, the command prefix that starts its workers (e.g. \"ip netns exec ns1\"); "
      "ranks are split over the nodes in equal blocks");
  app.add_option("--node-address", a.node_address,
                 "cluster: per node, the address its collectives bind to");
  return gemma2::RunTool("gemma2-run", app, argc, argv, [&] { return gemma2::Run(a); });
}
