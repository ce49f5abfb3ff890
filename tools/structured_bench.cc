// gemma2-structured-bench: what the constraint engine costs per step on this machine, at a real
// vocabulary: a random walk through the allowed tokens (a model that knows nothing) under a JSON
// object, a 10-property JSON Schema and a regex; per step the time of TokenMasker::Allowed, the
// first steps (cold: each grammar position's walk over the vocabulary, done once) apart from the
// rest, and how many steps met a new state (a walk over the vocabulary; the others are a cached
// mask). Prints a table and, with --out, JSON.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "cli/run_tool.h"
#include "model/tokenizer.h"
#include "serving/timed_call.h"
#include "structured/json_schema.h"
#include "structured/matcher.h"
#include "structured/token_masker.h"

namespace gemma2 {
namespace {

using namespace structured;

struct Args {
  std::string tokenizer = "../shared/tokenizers/gemma2-tokenizer.model";
  int steps = 400;
  int passes = 1;  // walks over one masker: later passes meet states an earlier one walked
  uint64_t seed = 1;
  std::string out;
  double show_slow_ms = 0;  // > 0: print every step slower than this, with the output before it
};

const char* kTenProperties = R"({"type":"object","properties":{
  "id":{"type":"integer","minimum":0,"maximum":100000},
  "name":{"type":"string","maxLength":40},
  "email":{"type":"string","maxLength":60},
  "age":{"type":"integer","minimum":0,"maximum":150},
  "active":{"type":"boolean"},
  "score":{"type":"number"},
  "tags":{"type":"array","items":{"type":"string","maxLength":16},"maxItems":5},
  "role":{"enum":["admin","user","guest"]},
  "address":{"type":"object","properties":{"city":{"type":"string","maxLength":30},
             "zip":{"type":"string","maxLength":10}},"required":["city"]},
  "note":{"type":["string","null"],"maxLength":80}},
  "required":["id","name","email","age","active","score","tags","role","address","note"]})";

struct Row {
  std::string name;
  double cold_ms = 0;  // the first step
  std::vector<double> step_ms;
  int64_t tokens_out = 0;
  int outputs = 0;          // finished outputs (a walk that reached a stop)
  int64_t cold_steps = 0;   // steps whose state was new: a walk over the vocabulary
};

Row Walk(const std::string& name, TokenMasker& masker, const Args& a, uint64_t seed) {
  Row row;
  row.name = name;
  const Grammar& g = masker.grammar();
  const TokenVocabulary* v = &masker.vocab();
  const int64_t walks_before = masker.walks();
  std::mt19937_64 rng(seed);
  TokenMask mask;
  State s = *Start(g), next;
  std::vector<int32_t> allowed;
  std::string text;  // the current output's bytes
  for (int step = 0; step < a.steps; ++step) {
    const auto t0 = std::chrono::steady_clock::now();
    masker.Allowed(s, mask);
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    if (step == 0) row.cold_ms = ms;
    row.step_ms.push_back(ms);
    if (a.show_slow_ms > 0 && ms > a.show_slow_ms) {
      std::printf("  %s step %d: %.3f ms after %s\n", name.c_str(), step, ms,
                  nlohmann::json(text.substr(text.size() > 60 ? text.size() - 60 : 0))
                      .dump(-1, ' ', false, nlohmann::json::error_handler_t::replace)
                      .c_str());
    }
    allowed.clear();
    for (int32_t id = 0; id < v->size(); ++id)
      if (mask.Test(id)) allowed.push_back(id);
    int32_t pick = allowed[std::uniform_int_distribution<size_t>(0, allowed.size() - 1)(rng)];
    const bool stop = Complete(s) && (rng() % 2 == 0 ||
                                      std::find(v->stop_ids().begin(), v->stop_ids().end(), pick) !=
                                          v->stop_ids().end());
    if (stop) {  // a finished output: the next walk starts
      ++row.outputs;
      s = *Start(g);
      text.clear();
      continue;
    }
    text += v->bytes(pick);
    for (char c : v->bytes(pick)) {
      Step(g, s, static_cast<uint8_t>(c), next);
      std::swap(s, next);
    }
    ++row.tokens_out;
  }
  row.cold_steps = masker.walks() - walks_before;
  return row;
}

Status Run(const Args& a) {
  ASSIGN_OR_RETURN(auto tok, Tokenizer::Load(a.tokenizer));
  auto vocab = std::make_shared<const TokenVocabulary>(tok->TokenBytes(), std::vector<int32_t>{1, 107});
  std::vector<Row> rows;
  ASSIGN_OR_RETURN(auto json_g, JsonGrammar());
  ASSIGN_OR_RETURN(auto schema_g, JsonSchemaGrammar(nlohmann::ordered_json::parse(kTenProperties)));
  ASSIGN_OR_RETURN(auto regex_g, RegexGrammar(R"([A-Z][a-z]{2,9} \d{3}-\d{4}( ext\. \d{1,4})?)"));
  const std::pair<const char*, std::shared_ptr<const Grammar>> grammars[] = {
      {"json_object", json_g}, {"schema_10_properties", schema_g}, {"regex_phone", regex_g}};
  for (const auto& [name, g] : grammars) {
    TokenMasker masker(g, vocab);  // one per grammar, as a server keeps one per compiled grammar
    for (int p = 0; p < a.passes; ++p) {
      const std::string label = a.passes > 1 ? std::string(name) + " #" + std::to_string(p + 1) : name;
      rows.push_back(Walk(label, masker, a, a.seed + static_cast<uint64_t>(p)));
    }
    const TokenMasker::Footprint f = masker.footprint();
    std::printf("%s: the masker holds %ld states and %ld masks, %.1f MB\n", name,
                static_cast<long>(f.states), static_cast<long>(f.masks), f.bytes / 1e6);
  }
  nlohmann::json out = {{"vocab", vocab->size()}, {"steps", a.steps}, {"passes", a.passes},
                        {"rows", nlohmann::json::array()}};
  std::printf(
      "vocabulary %ld tokens (longest %zu bytes; whole-text tokens up to %ld characters), "
      "%d steps per grammar\n",
      static_cast<long>(vocab->size()), vocab->max_bytes(), static_cast<long>(vocab->max_chars()),
      a.steps);
  std::printf("%-22s %10s %9s %9s %9s %8s %6s\n", "grammar", "first ms", "p50 ms", "p99 ms", "max ms",
              "outputs", "cold");
  for (Row& r : rows) {
    std::vector<double> warm(r.step_ms.begin() + 1, r.step_ms.end());
    const double p50 = serving::Percentile(warm, 50), p99 = serving::Percentile(warm, 99);
    const double mx = warm.empty() ? 0 : *std::max_element(warm.begin(), warm.end());
    std::printf("%-22s %10.2f %9.3f %9.3f %9.3f %8d %6ld\n", r.name.c_str(), r.cold_ms, p50, p99, mx,
                r.outputs, static_cast<long>(r.cold_steps));
    out["rows"].push_back({{"grammar", r.name}, {"first_ms", r.cold_ms}, {"p50_ms", p50},
                           {"p99_ms", p99}, {"max_ms", mx}, {"outputs", r.outputs},
                           {"cold_steps", r.cold_steps}, {"tokens", r.tokens_out}});
  }
  if (!a.out.empty()) std::ofstream(a.out) << out.dump(2) << "\n";
  return OkStatus();
}

}  // namespace
}  // namespace gemma2

int main(int argc, char** argv) {
  gemma2::Args a;
  CLI::App app{"gemma2-structured-bench: the constraint engine's cost per step"};
  app.add_option("--tokenizer", a.tokenizer, "sentencepiece model (Gemma's vocabulary)");
  app.add_option("--steps", a.steps, "steps per grammar")->check(CLI::Range(2, 1000000));
  app.add_option("--seed", a.seed, "the random walk's seed (pass p: seed + p)");
  app.add_option("--passes", a.passes,
                 "walks over one masker per grammar: later passes show the steady state of a "
                 "grammar served again")
      ->check(CLI::Range(1, 100));
  app.add_option("--show-slow", a.show_slow_ms,
                 "print each step slower than this many ms, after the output's last 60 bytes");
  app.add_option("--out", a.out, "write the results as JSON here");
  return gemma2::RunTool("gemma2-structured-bench", app, argc, argv, [&] { return gemma2::Run(a); });
}
