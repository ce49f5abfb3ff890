// Server metrics in Prometheus' text format. Every request is counted once when it arrives and
// once more when it ends, under exactly one outcome, so
//   received = success + rejected + failed + cancelled   (once nothing is in flight).
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#include "common/mutex.h"

namespace gemma2::serving {

enum class Outcome { kSuccess, kRejected, kFailed, kCancelled };

class Histogram {
 public:
  explicit Histogram(std::vector<double> bounds)
      : bounds_(std::move(bounds)), counts_(bounds_.size() + 1) {}
  void Observe(double v);
  void Render(std::string& out, const std::string& name, const std::string& help) const;

 private:
  mutable Mutex mu_;
  const std::vector<double> bounds_;
  std::vector<uint64_t> counts_ GUARDED_BY(mu_);
  double sum_ GUARDED_BY(mu_) = 0;
  uint64_t count_ GUARDED_BY(mu_) = 0;
};

struct Metrics {
  std::atomic<uint64_t> received{0};
  std::array<std::atomic<uint64_t>, 4> outcomes{};  // by Outcome
  std::atomic<uint64_t> prompt_tokens{0}, generation_tokens{0}, preemptions{0}, steps{0};
  std::atomic<int64_t> queue_depth{0}, running{0}, kv_blocks_used{0}, kv_blocks_free{0},
      kv_blocks_cached{0};
  std::atomic<uint64_t> prefix_hit_tokens{0};
  // At --max-connections: idle connections closed to admit new ones, and new ones refused (503)
  // because every open one was busy with a request.
  std::atomic<uint64_t> evicted_connections{0}, refused_connections{0};
  std::atomic<uint64_t> prefix_query_tokens{0};  // prompt tokens looked up in the prefix cache
  // Choices that finished, by reason (the success counter's finished_reason label).
  std::atomic<uint64_t> finished_stop{0}, finished_length{0};
  Histogram ttft{{0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30}};
  Histogram itl{{0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5}};
  // Per successful request, in seconds: arrival to its last token (e2e), arrival to admission
  // (queue), admission to first token (prefill), first token to the last (decode).
  Histogram e2e{{0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 60, 120, 300}};
  Histogram queue_time{{0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60}};
  Histogram prefill_time{{0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30}};
  Histogram decode_time{{0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 60, 120, 300}};
  // Per successful request: prompt and generated tokens (all its prompts and choices).
  Histogram prompt_tokens_per_request{{1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000}};
  Histogram generation_tokens_per_request{{1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000}};

  void End(Outcome o) { outcomes[static_cast<size_t>(o)].fetch_add(1); }
  // Prometheus text; every series carries model_name="<model_name>".
  std::string Render(const std::string& model_name) const;
};

}  // namespace gemma2::serving
