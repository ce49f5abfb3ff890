// gemma2-bench: decode and prefill speed of one engine, with the achieved HBM bandwidth and
// TFLOP/s against the measured ceilings of the GPU host (../shared/gpu/README.md).
//
//   gemma2-bench --backend cuda --random-weights 1 --preset 27b --out bench.json
//
// Decode: B sequences each prefilled with P random tokens, then `--steps` greedy decode steps of
// B tokens (argmax on the device); the figure is the median step time. Prefill: one sequence of L
// tokens, median of `--repeat` runs. Bytes per decode step = every weight once + the KV cache the
// step reads (sliding layers at most `sliding_window` positions); FLOPs of a prefill = 2 x matmul
// parameters x L + attention (4 x visible keys x head_dim per head and layer).
#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <random>

#include "coordinator/cluster.h"
#include "engine/engine.h"
#include "model/weight_source.h"
#include "cli/options.h"
#include "cli/run_tool.h"

namespace gemma2 {
namespace {

using Clock = std::chrono::steady_clock;

struct Args {
  std::string model, preset = "27b", backend = "cuda", out, quantization = "auto";
  std::string kv_cache_dtype = "auto";
  uint64_t random_weights = 1;
  int64_t layers = 0, steps = 32, repeat = 3;
  std::vector<int64_t> batches = {1, 16, 64}, prompts = {128, 2048},
                       prefills = {128, 512, 2048, 8192};
  double hbm_tbps = 4.28, gemm_tflops = 802;  // measured ceilings of the H200 host
  double kv_cache_gb = 0;
  // A cluster instead of one process: worker processes over the control plane (NCCL on GPUs).
  std::string launch = "none";
  int tp = 1, pp = 1;
};

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

// Bytes a decode step streams: the projections in bf16 (2 bytes each) or FP8 (1 byte and an fp32
// scale per output row), the norms and the embedding (the tied LM head) in bf16.
int64_t WeightBytes(const ModelConfig& c, const std::string& quantization) {
  const int64_t h = c.hidden_size;
  const int64_t projections = h * c.q_size() * 2 + h * c.kv_size() * 2 + 3 * h * c.intermediate_size;
  const int64_t rows = c.q_size() + 2 * c.kv_size() + h + 2 * c.intermediate_size + h;
  const int64_t per_layer = quantization == "fp8" ? projections + 4 * rows + 2 * 4 * h
                                                  : 2 * (projections + 4 * h);
  return 2 * (c.vocab_size * h + h) + c.num_layers * per_layer;
}

int64_t MatmulParams(const ModelConfig& c) {
  const int64_t h = c.hidden_size;
  return c.num_layers * (h * c.q_size() * 2 + h * c.kv_size() * 2 + 3 * h * c.intermediate_size) +
         c.vocab_size * h;
}

// Keys visible to a query at `pos` in layer l.
int64_t Visible(const ModelConfig& c, int64_t layer, int64_t pos) {
  const int64_t w = c.layer_is_sliding[static_cast<size_t>(layer)] ? c.sliding_window : 0;
  return w > 0 ? std::min(pos + 1, w) : pos + 1;
}

std::vector<int32_t> RandomTokens(int64_t n, int64_t vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (auto& x : t) x = static_cast<int32_t>(4 + rng() % static_cast<uint64_t>(vocab - 4));
  t[0] = 2;
  return t;
}

Result<double> TimeStep(StepExecutor& e, const StepPlan& plan) {
  const auto t0 = Clock::now();
  ASSIGN_OR_RETURN(StepOutput out, e.Step(plan));
  (void)out;
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

Result<nlohmann::json> Prefill(StepExecutor& e, const Args& a, int64_t len) {
  const ModelConfig& c = e.config();
  std::vector<double> ms;
  for (int64_t r = 0; r < a.repeat + 1; ++r) {  // the first run warms up
    const int64_t id = e.NewSequence();
    StepPlan plan;
    plan.ids_only = true;
    plan.sequences.push_back({id, 0, RandomTokens(len, c.vocab_size, 7 + r), {len - 1}});
    auto t = TimeStep(e, plan);
    e.ReleaseSequence(id);
    if (!t.ok()) return t.status();
    if (r > 0) ms.push_back(*t);
  }
  const double m = Median(ms);
  double attn = 0;
  for (int64_t l = 0; l < c.num_layers; ++l) {
    for (int64_t p = 0; p < len; ++p)
      attn += 4.0 * static_cast<double>(Visible(c, l, p)) * c.head_dim * c.num_heads;
  }
  const double flops = 2.0 * static_cast<double>(MatmulParams(c)) * len + attn;
  const double tflops = flops / (m * 1e-3) / 1e12 / (a.tp * a.pp);  // per GPU
  return nlohmann::json{{"kind", "prefill"},
                        {"tokens", len},
                        {"ms", m},
                        {"tflops", tflops},
                        {"gemm_ceiling_fraction", tflops / a.gemm_tflops}};
}

Result<nlohmann::json> Decode(StepExecutor& e, const Args& a, int64_t batch, int64_t prompt) {
  const ModelConfig& c = e.config();
  std::vector<int64_t> ids;
  auto release = [&] {
    for (int64_t id : ids) e.ReleaseSequence(id);
  };
  for (int64_t b = 0; b < batch; ++b) {
    ids.push_back(e.NewSequence());
    StepPlan plan;
    plan.ids_only = true;
    plan.sequences.push_back(
        {ids.back(), 0, RandomTokens(prompt, c.vocab_size, 100 + b), {prompt - 1}});
    auto t = TimeStep(e, plan);
    if (!t.ok()) {
      release();
      return t.status().WithContext("prefilling decode batch " + std::to_string(batch));
    }
  }
  std::vector<double> ms;
  for (int64_t s = 0; s < a.steps + 2; ++s) {
    StepPlan plan;
    plan.ids_only = true;
    for (int64_t b = 0; b < batch; ++b) {
      plan.sequences.push_back({ids[static_cast<size_t>(b)],
                                prompt + s,
                                {static_cast<int32_t>(5 + (b + s) % 100)},
                                {0}});
    }
    auto t = TimeStep(e, plan);
    if (!t.ok()) {
      release();
      return t.status();
    }
    if (s >= 2) ms.push_back(*t);  // two warm-up steps
  }
  release();
  const double m = Median(ms);
  // K and V of every visible position: bf16, or FP8 and an fp32 scale per head.
  const double kv_elem =
      a.kv_cache_dtype == "fp8" ? 1.0 + 4.0 / static_cast<double>(c.head_dim) : 2.0;
  double kv_bytes = 0;
  for (int64_t l = 0; l < c.num_layers; ++l) {
    kv_bytes += static_cast<double>(batch) * Visible(c, l, prompt + a.steps / 2) * 2 * c.kv_size() *
                kv_elem;
  }
  const double bytes = static_cast<double>(WeightBytes(c, a.quantization)) + kv_bytes;
  const double tbps = bytes / (m * 1e-3) / 1e12 / a.tp;  // per GPU: the group streams in parallel
  return nlohmann::json{{"kind", "decode"},
                        {"batch", batch},
                        {"prompt", prompt},
                        {"ms_per_step", m},
                        {"tokens_per_s", batch * 1000.0 / m},
                        {"hbm_tb_per_s", tbps},
                        {"hbm_ceiling_fraction", tbps / a.hbm_tbps},
                        {"floor_ms", bytes / (a.hbm_tbps * 1e12 * a.tp) * 1e3}};
}

Status Run(Args a) {
  std::unique_ptr<WeightSource> weights;
  if (!a.model.empty()) {  // a checkpoint directory or random:SHAPE:SEED[:LAYERS]
    ASSIGN_OR_RETURN(weights, OpenWeightSource(a.model));
  } else {
    ASSIGN_OR_RETURN(ModelConfig c, PresetConfig(a.preset));
    if (a.layers > 0) {
      c.num_layers = std::min(c.num_layers, a.layers);
      c.layer_is_sliding.resize(static_cast<size_t>(c.num_layers));
    }
    weights = std::make_unique<RandomWeights>(c, a.random_weights);
  }
  const WeightSource& ws = *weights;
  ASSIGN_OR_RETURN(const Quantization quantization, ResolveQuantization(a.quantization, a.model));
  const std::string qname(QuantizationName(quantization));
  a.quantization = qname;  // what the ranks use, for every figure below
  ASSIGN_OR_RETURN(const KvCacheDtype kv_dtype, ParseKvCacheDtype(a.kv_cache_dtype));
  a.kv_cache_dtype = KvCacheDtypeName(kv_dtype);
  const auto t0 = Clock::now();
  std::unique_ptr<StepExecutor> engine;
  if (a.launch == "local") {
    ClusterOptions co;
    co.model = a.model.empty() ? RandomWeightsSpec(a.preset, a.random_weights, a.layers) : a.model;
    co.tp = a.tp;
    co.pp = a.pp;
    co.backend = a.backend;
    co.quantization = a.quantization;
    co.kv_cache_dtype = a.kv_cache_dtype;
    ASSIGN_OR_RETURN(engine, ClusterEngine::LaunchLocal(co));
  } else {
    if (a.tp != 1 || a.pp != 1)
      return InvalidArgument("--tp/--pp need --launch local (one process per rank)");
    EngineOptions eo;
    eo.backend.name = a.backend;
    eo.quantization = quantization;
    eo.kv_cache_dtype = kv_dtype;
    eo.backend.kv_cache_bytes = static_cast<int64_t>(a.kv_cache_gb * (1 << 30));
    eo.progress = StderrLoadProgress("gemma2-bench");
    ASSIGN_OR_RETURN(engine, Engine::Create(ws, eo));
  }
  const double load_s = std::chrono::duration<double>(Clock::now() - t0).count();
  const ModelConfig& c = engine->config();
  std::fprintf(stderr, "gemma2-bench: loaded %.2f GB of weights in %.1f s\n", WeightBytes(c, qname) / 1e9,
               load_s);
  // The KV pool's capacity: blocks, positions, and whole sequences of 8192 positions.
  const KvLayout layout = engine->kv_layout();
  const int64_t per_8192 = layout.BudgetFor(8192, 8192);
  const int64_t seqs_8192 = per_8192 > 0 ? engine->kv_blocks() / per_8192 : 0;
  std::printf("KV cache (%s): %lld blocks of %lld positions, %lld sequences of 8192 positions\n",
              a.kv_cache_dtype.c_str(), static_cast<long long>(engine->kv_blocks()),
              static_cast<long long>(layout.block_size), static_cast<long long>(seqs_8192));

  nlohmann::json results = nlohmann::json::array();
  std::printf("%-8s %6s %7s %12s %11s %9s %9s\n", "kind", "batch", "tokens", "ms", "tok/s",
              "TB/s|TF/s", "of ceil");
  for (int64_t p : a.prompts) {
    for (int64_t b : a.batches) {
      auto r = Decode(*engine, a, b, p);
      if (!r.ok()) {
        std::fprintf(stderr, "gemma2-bench: decode batch %ld prompt %ld: %s\n",
                     static_cast<long>(b), static_cast<long>(p), r.status().message().c_str());
        results.push_back(
            {{"kind", "decode"}, {"batch", b}, {"prompt", p}, {"error", r.status().message()}});
        continue;
      }
      std::printf("%-8s %6ld %7ld %12.2f %11.1f %9.2f %8.0f%%\n", "decode", static_cast<long>(b),
                  static_cast<long>(p), (*r)["ms_per_step"].get<double>(),
                  (*r)["tokens_per_s"].get<double>(), (*r)["hbm_tb_per_s"].get<double>(),
                  100 * (*r)["hbm_ceiling_fraction"].get<double>());
      std::fflush(stdout);
      results.push_back(*r);
    }
  }
  for (int64_t len : a.prefills) {
    auto r = Prefill(*engine, a, len);
    if (!r.ok()) {
      std::fprintf(stderr, "gemma2-bench: prefill %ld: %s\n", static_cast<long>(len),
                   r.status().message().c_str());
      results.push_back({{"kind", "prefill"}, {"tokens", len}, {"error", r.status().message()}});
      continue;
    }
    std::printf("%-8s %6d %7ld %12.2f %11.1f %9.1f %8.0f%%\n", "prefill", 1, static_cast<long>(len),
                (*r)["ms"].get<double>(), len * 1000.0 / (*r)["ms"].get<double>(),
                (*r)["tflops"].get<double>(), 100 * (*r)["gemm_ceiling_fraction"].get<double>());
    std::fflush(stdout);
    results.push_back(*r);
  }
  nlohmann::json doc{{"model", a.model.empty() ? "random " + a.preset : a.model},
                     {"tp", a.tp},
                     {"pp", a.pp},
                     {"layers", c.num_layers},
                     {"backend", a.backend},
                     {"quantization", qname},
                     {"kv_cache_dtype", a.kv_cache_dtype},
                     {"kv_blocks", engine->kv_blocks()},
                     {"kv_sequences_of_8192", seqs_8192},
                     {"weight_bytes", WeightBytes(c, qname)},
                     {"load_s", load_s},
                     {"ceilings", {{"hbm_tb_per_s", a.hbm_tbps}, {"gemm_tflops", a.gemm_tflops}}},
                     {"results", results}};
  if (!a.out.empty()) {
    std::ofstream(a.out) << doc.dump(2) << "\n";
  }
  return OkStatus();
}

}  // namespace
}  // namespace gemma2

int main(int argc, char** argv) {
  gemma2::Args a;
  CLI::App app{"gemma2-bench: decode and prefill speed against the hardware ceilings"};
  gemma2::cli::AddModel(app, a.model, "default: random weights of --preset");
  app.add_option("--preset", a.preset, "2b, 9b or 27b (random weights)");
  app.add_option("--random-weights", a.random_weights, "seed of the random weights");
  app.add_option("--layers", a.layers, "keep the first N layers (widths exact)");
  gemma2::cli::AddBackend(app, a.backend);
  gemma2::cli::AddQuantization(app, a.quantization);
  gemma2::cli::AddKvCacheDtype(app, a.kv_cache_dtype);
  app.add_option("--batches", a.batches, "decode batch sizes")->delimiter(',');
  app.add_option("--prompts", a.prompts, "decode prompt lengths")->delimiter(',');
  app.add_option("--prefills", a.prefills, "prefill lengths")->delimiter(',');
  app.add_option("--steps", a.steps, "timed decode steps");
  app.add_option("--repeat", a.repeat, "timed prefill runs");
  app.add_option("--kv-cache-gb", a.kv_cache_gb, "KV cache size (0: 90% of free memory)");
  app.add_option("--launch", a.launch,
                 "none (one process) or local (a cluster of worker processes)")
      ->check(CLI::IsMember({"none", "local"}));
  gemma2::cli::AddTp(app, a.tp, "with --launch local");
  gemma2::cli::AddPp(app, a.pp, "with --launch local");
  app.add_option("--out", a.out, "write the results as JSON here");
  return gemma2::RunTool("gemma2-bench", app, argc, argv, [&] { return gemma2::Run(a); });
}
