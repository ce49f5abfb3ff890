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

// Puts `label` (k="v") into every sample line of Prometheus text: first among a line's labels.
std::string Labelled(const std::string& text, const std::string& label) {
  std::string out;
  size_t at = 0;
  while (at < text.size()) {
    size_t end = text.find('\n', at);
    if (end == std::string::npos) end = text.size();
    const std::string line = text.substr(at, end - at);
    at = end + 1;
    if (line.empty() || line[0] == '#') {
      out += line + "\n";
      continue;
    }
    const size_t brace = line.find('{'), space = line.find(' ');
    if (brace != std::string::npos && brace < space) {
      out += line.substr(0, brace + 1) + label + "," + line.substr(brace + 1) + "\n";
    } else {
      out += line.substr(0, space) + "{" + label + "}" + line.substr(space) + "\n";
    }
  }
  return out;
}

// A label value as Prometheus' text format quotes it.
std::string Quoted(const std::string& v) {
  std::string q;
  for (char c : v) {
    if (c == '\\' || c == '"') q += '\\';
    if (c == '\n') {
      q += "\\n";
      continue;
    }
    q += c;
  }
  return q;
}

}  // namespace

void Histogram::Observe(double v) {
  MutexLock lock(mu_);
  const size_t i =
      static_cast<size_t>(std::lower_bound(bounds_.begin(), bounds_.end(), v) - bounds_.begin());
  ++counts_[i];
  sum_ += v;
  ++count_;
}

void Histogram::Render(std::string& out, const std::string& name, const std::string& help) const {
  MutexLock lock(mu_);
  out += "# HELP " + name + " " + help + "\n# TYPE " + name + " histogram\n";
  uint64_t cumulative = 0;
  for (size_t i = 0; i < bounds_.size(); ++i) {
    cumulative += counts_[i];
    out += name + "_bucket{le=\"" + Num(bounds_[i]) + "\"} " + std::to_string(cumulative) + "\n";
  }
  out += name + "_bucket{le=\"+Inf\"} " + std::to_string(count_) + "\n";
  out += name + "_sum " + Num(sum_) + "\n" + name + "_count " + std::to_string(count_) + "\n";
}

std::string Metrics::Render(const std::string& model_name) const {
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
  Line(out, "gemma2_prefix_cache_queries_total", "counter",
       "prompt tokens looked up in the prefix cache (hits / queries: the hit rate)",
       static_cast<double>(prefix_query_tokens.load()));
  const double used = static_cast<double>(kv_blocks_used.load()),
               all = used + static_cast<double>(kv_blocks_free.load() + kv_blocks_cached.load());
  Line(out, "gemma2_kv_cache_usage", "gauge",
       "fraction of KV-cache blocks held by running sequences (0-1; cached prefixes count as free)",
       all > 0 ? used / all : 0.0);
  out += "# HELP gemma2_request_success_total choices that finished, by finish reason\n"
         "# TYPE gemma2_request_success_total counter\n"
         "gemma2_request_success_total{finished_reason=\"stop\"} " +
         std::to_string(finished_stop.load()) +
         "\n"
         "gemma2_request_success_total{finished_reason=\"length\"} " +
         std::to_string(finished_length.load()) + "\n";
  ttft.Render(out, "gemma2_time_to_first_token_seconds", "arrival to first generated token");
  itl.Render(out, "gemma2_inter_token_latency_seconds",
             "time between consecutive tokens of a sequence");
  e2e.Render(out, "gemma2_e2e_request_latency_seconds", "arrival to the last token, per request");
  queue_time.Render(out, "gemma2_request_queue_time_seconds",
                    "arrival to admission into the running batch, per request");
  prefill_time.Render(out, "gemma2_request_prefill_time_seconds",
                      "admission to the first token, per request");
  decode_time.Render(out, "gemma2_request_decode_time_seconds",
                     "first token to the last, per request");
  prompt_tokens_per_request.Render(out, "gemma2_request_prompt_tokens",
                                   "prompt tokens of each finished request");
  generation_tokens_per_request.Render(out, "gemma2_request_generation_tokens",
                                       "generated tokens of each finished request");
  return Labelled(out, "model_name=\"" + Quoted(model_name) + "\"");
}

}  // namespace gemma2::serving
