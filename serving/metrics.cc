#include "serving/metrics.h"

#include <algorithm>
#include <cstdio>

namespace gemma2::serving {
namespace {

std::string Num(double v) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.9g", v);
  return buf;
}

void Line(std::string& out, const std::string& name, const std::string& type,
          const std::string& help, double v) {
  out += "# HELP " + name + " " + help + "\n# TYPE " + name + " " + type + "\n" + name + " " +
         Num(v) + "\n";
}

}  // namespace

void Histogram::Observe(double v) {
  std::lock_guard<std::mutex> lock(mu_);
  const size_t i =
      static_cast<size_t>(std::lower_bound(bounds_.begin(), bounds_.end(), v) - bounds_.begin());
  ++counts_[i];
  sum_ += v;
  ++count_;
}

void Histogram::Render(std::string& out, const std::string& name, const std::string& help) const {
  std::lock_guard<std::mutex> lock(mu_);
  out += "# HELP " + name + " " + help + "\n# TYPE " + name + " histogram\n";
  uint64_t cumulative = 0;
  for (size_t i = 0; i < bounds_.size(); ++i) {
    cumulative += counts_[i];
    out += name + "_bucket{le=\"" + Num(bounds_[i]) + "\"} " + std::to_string(cumulative) + "\n";
  }
  out += name + "_bucket{le=\"+Inf\"} " + std::to_string(count_) + "\n";
  out += name + "_sum " + Num(sum_) + "\n" + name + "_count " + std::to_string(count_) + "\n";
}

std::string Metrics::Render() const {
  std::string out;
  Line(out, "gemma2_requests_received_total", "counter", "API requests received",
       static_cast<double>(received.load()));
  out +=
      "# HELP gemma2_requests_total API requests ended, by outcome\n# TYPE gemma2_requests_total "
      "counter\n";
  const char* names[] = {"success", "rejected", "failed", "cancelled"};
  for (size_t i = 0; i < outcomes.size(); ++i) {
    out += std::string("gemma2_requests_total{outcome=\"") + names[i] + "\"} " +
           std::to_string(outcomes[i].load()) + "\n";
  }
  Line(out, "gemma2_queue_depth", "gauge", "requests waiting for the running batch",
       static_cast<double>(queue_depth.load()));
  Line(out, "gemma2_running_sequences", "gauge", "sequences in the running batch",
       static_cast<double>(running.load()));
  Line(out, "gemma2_kv_blocks_used", "gauge", "KV-cache blocks held by sequences",
       static_cast<double>(kv_blocks_used.load()));
  Line(out, "gemma2_kv_blocks_free", "gauge", "KV-cache blocks free",
       static_cast<double>(kv_blocks_free.load()));
  Line(out, "gemma2_kv_blocks_cached", "gauge",
       "KV-cache blocks held by cached prompt prefixes (evictable)",
       static_cast<double>(kv_blocks_cached.load()));
  Line(out, "gemma2_prefix_cache_hit_tokens_total", "counter",
       "prompt tokens copied from cached prefixes instead of computed",
       static_cast<double>(prefix_hit_tokens.load()));
  Line(out, "gemma2_prompt_tokens_total", "counter",
       "prompt tokens computed (recomputation included)",
       static_cast<double>(prompt_tokens.load()));
  Line(out, "gemma2_generation_tokens_total", "counter", "tokens generated",
       static_cast<double>(generation_tokens.load()));
  Line(out, "gemma2_preemptions_total", "counter",
       "sequences preempted for KV blocks (recomputed later)",
       static_cast<double>(preemptions.load()));
  Line(out, "gemma2_steps_total", "counter", "forward steps run",
       static_cast<double>(steps.load()));
  Line(out, "gemma2_connections_evicted_total", "counter",
       "idle connections closed to admit a new one at --max-connections",
       static_cast<double>(evicted_connections.load()));
  Line(out, "gemma2_connections_refused_total", "counter",
       "connections answered 503 at once: every connection was busy at --max-connections",
       static_cast<double>(refused_connections.load()));
  ttft.Render(out, "gemma2_time_to_first_token_seconds", "arrival to first generated token");
  itl.Render(out, "gemma2_inter_token_latency_seconds",
             "time between consecutive tokens of a sequence");
  return out;
}

}  // namespace gemma2::serving
