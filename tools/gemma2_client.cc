// gemma2-client: sends a file of prompts to any OpenAI-compatible server with N requests in
// flight, retries 429/503 with backoff, shows progress, and writes one result line per input line
// in input order, then a summary (requests, failures, latency percentiles, tokens/s).
//
//   gemma2-client --url http://127.0.0.1:8000 --input prompts.jsonl --output results.jsonl
//                 --concurrency 32 [--max-tokens N] [--stream]
//
// Input lines: a JSON object with "prompt" (completions), "messages" (chat) or "input" (classify)
// and any other request fields; or plain text, sent as a completions prompt.
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <random>
#include <thread>

#include "cli/run_tool.h"
#include "common/json_depth.h"
#include "serving/http_client.h"
#include "serving/timed_call.h"

namespace gemma2 {
namespace {

using nlohmann::json;
using Clock = std::chrono::steady_clock;
using serving::HttpCall;

struct Args {
  std::string url = "http://127.0.0.1:8000", input, output, model, api_key, summary_json;
  int concurrency = 32, max_retries = 8;
  int64_t max_tokens = 0;  // 0: as the line says (or the server's default)
  bool stream = false, progress = false;
  std::string format = "jsonl";
  double timeout_s = 600;
};

struct Job {
  std::string path;  // /v1/completions, /v1/chat/completions, /v1/classify
  json body;
};

struct Outcome {
  json line;
  bool ok = false;
  int retries = 0;
  double latency_s = 0, ttft_s = -1;
  std::vector<double> itl_s;
  int64_t completion_tokens = 0;
};

Result<Job> ParseLine(const std::string& line, size_t number, const Args& a) {
  Job job;
  if (!line.empty() && line[0] == '{') {
    if (!JsonNestingWithin(line, kMaxPeerJsonDepth))
      return InvalidArgument("line " + std::to_string(number) + ": JSON nested deeper than " +
                             std::to_string(kMaxPeerJsonDepth) + " levels");
    json j = json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.is_object()) {
      return InvalidArgument("line " + std::to_string(number) + ": not a JSON object");
    }
    if (j.contains("stream") && !j["stream"].is_boolean())
      return InvalidArgument("line " + std::to_string(number) + ": 'stream' must be true or false");
    job.body = std::move(j);
  } else {
    job.body = {{"prompt", line}};
  }
  if (job.body.contains("messages")) {
    job.path = "/v1/chat/completions";
  } else if (job.body.contains("input")) {
    job.path = "/v1/classify";
  } else if (job.body.contains("prompt")) {
    job.path = "/v1/completions";
  } else {
    return InvalidArgument("line " + std::to_string(number) +
                           ": needs \"prompt\", \"messages\" or \"input\"");
  }
  if (!job.body.contains("model")) job.body["model"] = a.model;
  if (job.path != "/v1/classify") {
    if (a.max_tokens > 0) job.body["max_tokens"] = a.max_tokens;
    if (a.stream) {
      job.body["stream"] = true;
      job.body["stream_options"] = {{"include_usage", true}};
    }
  }
  return job;
}

Outcome RunJob(const serving::Url& url, const Job& job, size_t index, const Args& a) {
  Outcome o;
  HttpCall call;
  call.path = job.path;
  call.body = job.body.dump();
  call.timeout = std::chrono::milliseconds(static_cast<int64_t>(a.timeout_s * 1000));
  if (!a.api_key.empty()) call.headers["Authorization"] = "Bearer " + a.api_key;
  const bool stream = job.body.value("stream", false);
  const bool chat = job.path == "/v1/chat/completions";
  thread_local std::mt19937 rng{std::random_device{}()};
  for (int attempt = 0;; ++attempt) {
    serving::TimedAnswer t = serving::CallTimed(url, call, stream, chat);
    o.latency_s = t.latency_s;
    o.ttft_s = t.ttft_s;
    o.itl_s = std::move(t.itl_s);
    if (!t.http.ok()) {
      o.line = {{"index", index}, {"error", t.http.status().message()}};
      return o;
    }
    const int status = t.http->status;
    if ((status == 429 || status == 503) && attempt < a.max_retries) {
      ++o.retries;
      double wait = std::min(30.0, 0.25 * std::pow(2.0, attempt));
      if (auto it = t.http->headers.find("retry-after"); it != t.http->headers.end()) {
        wait = std::max(wait, std::atof(it->second.c_str()));
      }
      wait *= std::uniform_real_distribution<double>(0.8, 1.2)(rng);
      std::this_thread::sleep_for(std::chrono::duration<double>(wait));
      continue;
    }
    o.ok = t.ok;
    o.line = {{"index", index}, {"status", status}, {"response", t.response}};
    o.completion_tokens = t.completion_tokens;
    return o;
  }
}

Status Run(Args a) {
  ASSIGN_OR_RETURN(serving::Url url, serving::ParseUrl(a.url));
  if (a.api_key.empty()) {
    if (const char* k = std::getenv("OPENAI_API_KEY")) a.api_key = k;
  }
  if (a.model.empty()) {  // the server's first model
    HttpCall call;
    call.method = "GET";
    call.path = "/v1/models";
    if (!a.api_key.empty()) call.headers["Authorization"] = "Bearer " + a.api_key;
    ASSIGN_OR_RETURN(auto r, serving::HttpRequest(url, call));
    json j = JsonNestingWithin(r.body, kMaxPeerJsonDepth) ? json::parse(r.body, nullptr, false)
                                                          : json(json::value_t::discarded);
    if (r.status != 200 || !j.is_object() || !j.contains("data") || !j["data"].is_array() ||
        j["data"].empty() || !j["data"][0].is_object() || !j["data"][0].contains("id") ||
        !j["data"][0]["id"].is_string()) {
      return Status(
          StatusCode::kUnavailable,
          "GET /v1/models answered " + std::to_string(r.status) + ": " + r.body.substr(0, 300));
    }
    a.model = j["data"][0]["id"];
  }
  std::ifstream in(a.input);
  if (!in) return NotFound("--input " + a.input + ": cannot read it");
  std::vector<Job> jobs;
  std::string line;
  for (size_t n = 1; std::getline(in, line); ++n) {
    if (line.empty()) continue;
    ASSIGN_OR_RETURN(Job job, ParseLine(line, n, a));
    jobs.push_back(std::move(job));
  }
  std::vector<Outcome> outcomes(jobs.size());
  std::atomic<size_t> next{0}, finished{0};
  std::atomic<int64_t> tokens{0};
  const auto start = Clock::now();
  const bool bar = a.progress || isatty(2);
  std::vector<std::thread> threads;
  for (int t = 0; t < std::max(1, std::min<int>(a.concurrency, static_cast<int>(jobs.size())));
       ++t) {
    threads.emplace_back([&] {
      for (size_t i; (i = next.fetch_add(1)) < jobs.size();) {
        outcomes[i] = RunJob(url, jobs[i], i, a);
        tokens += outcomes[i].completion_tokens;
        ++finished;
      }
    });
  }
  while (bar && finished.load() < jobs.size()) {
    const double s = std::chrono::duration<double>(Clock::now() - start).count();
    const size_t done = finished.load();
    const int width = 30,
              filled = jobs.empty() ? width : static_cast<int>(width * done / jobs.size());
    std::fprintf(stderr, "\r[%s%s] %zu/%zu  %.0f tok/s ",
                 std::string(static_cast<size_t>(filled), '#').c_str(),
                 std::string(static_cast<size_t>(width - filled), '.').c_str(), done, jobs.size(),
                 s > 0 ? static_cast<double>(tokens.load()) / s : 0.0);
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  for (auto& t : threads) t.join();
  const double wall = std::chrono::duration<double>(Clock::now() - start).count();
  if (bar) std::fprintf(stderr, "\n");

  std::ofstream out_file;
  if (!a.output.empty()) {
    out_file.open(a.output);
    if (!out_file) return NotFound("--output " + a.output + ": cannot write it");
  }
  std::ostream& out = a.output.empty() ? std::cout : out_file;
  size_t failures = 0;
  int retries = 0;
  std::vector<double> latency, ttft, itl;
  for (size_t i = 0; i < outcomes.size(); ++i) {
    const Outcome& o = outcomes[i];
    if (a.format == "text") {  // what a person reads: the input, then each answer
      try {                    // a request or an answer of another shape is printed as it is
        const json& req = jobs[i].body;
        const json shown = req.contains("messages") ? req["messages"].back()["content"]
                           : req.contains("input")  ? req["input"]
                                                    : req["prompt"];
        out << "[" << i << "] " << (shown.is_string() ? shown.get<std::string>() : shown.dump())
            << "\n";
        const json& resp = o.line.contains("response") ? o.line["response"] : o.line;
        if (!o.ok) {
          out << "    error: " << (resp.contains("error") ? resp["error"].dump() : o.line.dump())
              << "\n";
        }
        for (const auto& c : o.ok ? resp.value("choices", json::array()) : json::array()) {
          const std::string text =
              c.contains("message") ? c["message"].value("content", "") : c.value("text", "");
          out << "    -> " << text << "   (" << c.value("finish_reason", "") << ")\n";
        }
        for (const auto& d : o.ok ? resp.value("data", json::array()) : json::array()) {
          out << "    -> " << d.value("label", "") << "\n";
        }
      } catch (const json::exception&) {
        out << "[" << i << "] " << o.line.dump(-1, ' ', false, json::error_handler_t::replace)
            << "\n";
      }
    } else {
      out << o.line.dump(-1, ' ', false, json::error_handler_t::replace) << "\n";
    }
    failures += !o.ok;
    retries += o.retries;
    latency.push_back(o.latency_s);
    if (o.ttft_s >= 0) ttft.push_back(o.ttft_s);
    itl.insert(itl.end(), o.itl_s.begin(), o.itl_s.end());
  }
  out.flush();  // results first, then the summary on stderr
  json summary = {{"requests", jobs.size()},
                  {"failures", failures},
                  {"retries", retries},
                  {"wall_s", wall},
                  {"completion_tokens", tokens.load()},
                  {"tokens_per_s", wall > 0 ? static_cast<double>(tokens.load()) / wall : 0},
                  {"latency_s",
                   {{"p50", serving::Percentile(latency, 50)},
                    {"p90", serving::Percentile(latency, 90)},
                    {"p99", serving::Percentile(latency, 99)}}}};
  if (!ttft.empty()) {
    summary["ttft_s"] = {{"p50", serving::Percentile(ttft, 50)},
                         {"p90", serving::Percentile(ttft, 90)},
                         {"p99", serving::Percentile(ttft, 99)}};
    summary["itl_s"] = {
        {"p50", serving::Percentile(itl, 50)}, {"p90", serving::Percentile(itl, 90)}, {"p99", serving::Percentile(itl, 99)}};
  }
  std::fprintf(
      stderr,
      "gemma2-client: %zu requests, %zu failed, %d retries, %.2f s, %lld tokens, %.1f tok/s\n",
      jobs.size(), failures, retries, wall, static_cast<long long>(tokens.load()),
      summary["tokens_per_s"].get<double>());
  std::fprintf(stderr, "  latency p50/p90/p99 %.3f/%.3f/%.3f s\n", serving::Percentile(latency, 50),
               serving::Percentile(latency, 90), serving::Percentile(latency, 99));
  if (!ttft.empty()) {
    std::fprintf(stderr, "  TTFT p50/p90/p99 %.3f/%.3f/%.3f s, ITL p50/p90/p99 %.4f/%.4f/%.4f s\n",
                 serving::Percentile(ttft, 50), serving::Percentile(ttft, 90), serving::Percentile(ttft, 99),
                 serving::Percentile(itl, 50), serving::Percentile(itl, 90), serving::Percentile(itl, 99));
  }
  if (!a.summary_json.empty()) std::ofstream(a.summary_json) << summary.dump(2) << "\n";
  if (failures > 0) {
    return Status(StatusCode::kUnavailable,
                  std::to_string(failures) + " of " + std::to_string(jobs.size()) +
                      " requests failed (their lines in the output say why)");
  }
  return OkStatus();
}

}  // namespace
}  // namespace gemma2

int main(int argc, char** argv) {
  gemma2::Args a;
  CLI::App app{"gemma2-client: batched prompts to an OpenAI-compatible server"};
  app.add_option("--url", a.url, "server address, http://HOST:PORT");
  app.add_option("--input", a.input, "JSON lines (or plain text lines)")->required();
  app.add_option("--output", a.output,
                 "results, one line per input line in input order (default: stdout)");
  app.add_option("--concurrency", a.concurrency, "requests in flight")->check(CLI::Range(1, 4096));
  app.add_option("--max-tokens", a.max_tokens, "max_tokens for every request")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 30));
  app.add_flag("--stream", a.stream,
               "stream every generation (measures TTFT and inter-token latency)");
  app.add_option("--model", a.model, "model name (default: the server's first)");
  app.add_option("--api-key", a.api_key, "API key (default: $OPENAI_API_KEY)");
  app.add_option("--max-retries", a.max_retries, "retries of a 429 or 503 answer")
      ->check(CLI::Range(0, 100));
  app.add_option("--timeout", a.timeout_s, "seconds any single read may take");
  app.add_flag("--progress", a.progress, "progress bar even when stderr is not a terminal");
  app.add_option("--summary-json", a.summary_json, "write the summary here as JSON");
  app.add_option("--format", a.format, "jsonl (one result object per line) or text (for people)")
      ->check(CLI::IsMember({"jsonl", "text"}));
  return gemma2::RunTool("gemma2-client", app, argc, argv, [&] { return gemma2::Run(a); });
}
