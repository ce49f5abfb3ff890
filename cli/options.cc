#include "cli/options.h"

#include <cstdint>

namespace gemma2::cli {
namespace {

std::string With(const std::string& help, const std::string& note) {
  return note.empty() ? help : help + " (" + note + ")";
}

std::string Seconds(std::chrono::milliseconds d) {
  std::string s = std::to_string(static_cast<double>(d.count()) / 1000.0);
  s.erase(s.find_last_not_of('0') + 1);
  if (!s.empty() && s.back() == '.') s.pop_back();
  return s;
}

CLI::Option* AddSeconds(CLI::App& app, const std::string& flag, std::chrono::milliseconds& d,
                        const std::string& help, double min_s = 0.1) {
  return app
      .add_option_function<double>(
          flag,
          [&d](double s) { d = std::chrono::milliseconds(static_cast<int64_t>(s * 1000.0)); },
          help + ", seconds")
      ->check(CLI::Validator(
          [min_s](const std::string& text) -> std::string {
            double s = 0;
            // CLI::Range lets NaN through (every comparison with it is false).
            if (!CLI::detail::lexical_cast(text, s) || !(s >= min_s && s <= 86400.0))
              return "Value " + text + " not in range " + Seconds(std::chrono::milliseconds(
                                                              static_cast<int64_t>(min_s * 1000))) +
                     " to 86400 seconds";
            return std::string();
          },
          "SECONDS"))
      ->default_str(Seconds(d));
}

}  // namespace

CLI::Option* AddModel(CLI::App& app, std::string& model, const std::string& note) {
  return app.add_option("--model", model, With("Hugging Face checkpoint directory", note));
}

CLI::Option* AddTp(CLI::App& app, int& tp, const std::string& note) {
  return app.add_option("--tp", tp, With("tensor-parallel ranks", note))
      ->check(CLI::Range(1, 1024));
}

CLI::Option* AddPp(CLI::App& app, int& pp, const std::string& note, int min_pp) {
  return app.add_option("--pp", pp, With("pipeline stages (contiguous layer ranges)", note))
      ->check(CLI::Range(min_pp, 1024));
}

CLI::Option* AddBackend(CLI::App& app, std::string& backend, const std::string& note) {
  return app
      .add_option("--backend", backend,
                  With("cpu (fp32 reference ops) or cuda (bf16 on one GPU per rank)", note))
      ->check(CLI::IsMember({"cpu", "cuda"}));
}

CLI::Option* AddQuantization(CLI::App& app, std::string& quantization) {
  return app
      .add_option("--quantization", quantization,
                  "projection weights: auto (fp8 for an FP8 checkpoint, else none), none (the "
                  "backend's dtype) or fp8 (E4M3 with a scale per output channel, quantized while "
                  "loading)")
      ->check(CLI::IsMember({"auto", "none", "fp8"}));
}

CLI::Option* AddKvCacheDtype(CLI::App& app, std::string& kv_cache_dtype) {
  return app
      .add_option("--kv-cache-dtype", kv_cache_dtype,
                  "the KV cache: auto (the backend's dtype: cpu fp32, cuda bf16) or fp8 / fp8_e4m3 "
                  "(E4M3 with a scale per position and kv head, chosen as each is written)")
      ->check(CLI::IsMember({"auto", "fp8", "fp8_e4m3"}));
}

void AddClusterTimeouts(CLI::App& app, ClusterTimeouts& t, bool connect) {
  AddSeconds(app, "--startup-timeout", t.startup,
             "every rank ready; a worker's wait for the coordinator's first word");
  AddSeconds(app, "--step-timeout", t.step,
             "a step's answers before it counts as hung; a worker's result send and collectives");
  AddSeconds(app, "--heartbeat-timeout", t.heartbeat,
             "an idle rank's answer to a heartbeat; the coordinator's silence a worker accepts");
  if (connect) {
    AddSeconds(app, "--connect-timeout", t.connect,
               "how long a worker keeps trying to reach the coordinator (0: once)", 0.0);
  }
}

}  // namespace gemma2::cli
