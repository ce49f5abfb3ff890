// gemma2-serve-bench: a serving benchmark against this server or any OpenAI-compatible one, as
// vLLM's and SGLang's serving benchmarks measure: random token-id prompts of given lengths sent at
// a Poisson request rate (or all at once) with at most --concurrency in flight, every answer
// streamed; reports request and token throughput, time to first token (TTFT), time per output
// token after the first (TPOT), inter-token latency (ITL) and end-to-end latency at p50/p90/p99,
// as a table and as JSON. --sweep runs several rates and draws output throughput against p99 ITL
// (SVG).
//
//   gemma2-serve-bench --url http://127.0.0.1:8000 --num-prompts 256 --input-len 512
//                      --output-len 128 --concurrency 64 [--request-rate inf] [--out run.json]
//   gemma2-serve-bench ... --sweep 1,2,4,8,inf --svg sweep.svg
#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <fstream>
#include <limits>
#include <mutex>
#include <nlohmann/json.hpp>
#include <numeric>
#include <random>
#include <thread>

#include "serving/request_parser.h"
#include "serving/timed_call.h"
#include "cli/run_tool.h"

namespace gemma2 {
namespace {

using nlohmann::json;
using Clock = std::chrono::steady_clock;

struct Args {
  std::string url = "http://127.0.0.1:8000", model, api_key, out, svg;
  int num_prompts = 256, warmup = 8, concurrency = 0;
  std::vector<int64_t> input_len = {512}, output_len = {128};  // one value, or a [lo, hi] range
  std::string request_rate = "inf";
  std::vector<std::string> sweep;
  int64_t vocab_size = 32000;
  uint64_t seed = 0;
  bool ignore_eos = true;
  bool chunk_stats = false;  // ask for usage in every chunk and count chunks of several tokens
  double timeout_s = 600;
  std::string extra_body;  // a JSON object merged into every request (e.g. a response_format)
  json extra = json::object();  // extra_body, parsed
};

struct Request {
  std::vector<int32_t> prompt;
  int64_t output_len = 0;
  double send_at_s = 0;  // after the run's start
};

struct Done {
  serving::TimedAnswer answer;
  int64_t prompt_len = 0;
};

int64_t Draw(const std::vector<int64_t>& range, std::mt19937_64& rng) {
  if (range.size() == 1) return range[0];
  return std::uniform_int_distribution<int64_t>(range[0], range[1])(rng);
}

// Prompts of random ids above the vocabulary's special and control pieces.
std::vector<Request> MakeRequests(const Args& a, int n, double rate, uint64_t seed) {
  std::mt19937_64 rng(seed);
  const int32_t lo = a.vocab_size > 1000 ? 1000 : 3;
  std::uniform_int_distribution<int32_t> id(lo, static_cast<int32_t>(a.vocab_size) - 1);
  std::exponential_distribution<double> gap(std::isinf(rate) ? 1.0 : rate);
  std::vector<Request> reqs(static_cast<size_t>(n));
  double t = 0;
  for (Request& r : reqs) {
    r.prompt.resize(static_cast<size_t>(Draw(a.input_len, rng)));
    for (int32_t& x : r.prompt) x = id(rng);
    r.output_len = Draw(a.output_len, rng);
    r.send_at_s = t;
    if (!std::isinf(rate)) t += gap(rng);
  }
  return reqs;
}

// Sends `reqs` at their times from a pool of workers, one request in flight each: the
// concurrency cap, or kMaxWorkers when unbounded.
constexpr int kMaxWorkers = 4096;

std::vector<Done> Send(const Args& a, const serving::Url& url, const std::vector<Request>& reqs,
                       double* wall_s) {
  std::vector<Done> done(reqs.size());
  std::mutex mu;
  std::condition_variable cv;
  size_t due = 0, next = 0;  // requests released by the clock; the next one a worker takes
  const int workers = static_cast<int>(std::min<size_t>(
      reqs.size(), static_cast<size_t>(a.concurrency > 0 ? a.concurrency : kMaxWorkers)));
  const auto start = Clock::now();
  auto work = [&] {
    while (true) {
      size_t i;
      {
        std::unique_lock<std::mutex> lock(mu);
        cv.wait(lock, [&] { return next < due || next == reqs.size(); });
        if (next == reqs.size()) return;
        i = next++;
      }
      json body = {{"prompt", reqs[i].prompt},
                   {"max_tokens", reqs[i].output_len},
                   {"temperature", 0},
                   {"stream", true},
                   {"stream_options", {{"include_usage", true}}}};
      if (a.chunk_stats) body["stream_options"]["continuous_usage_stats"] = true;
      if (!a.model.empty()) body["model"] = a.model;
      if (a.ignore_eos) body["ignore_eos"] = true;
      body.update(a.extra);
      serving::HttpCall call;
      call.path = "/v1/completions";
      call.body = body.dump();
      call.timeout = std::chrono::milliseconds(static_cast<int64_t>(a.timeout_s * 1000));
      if (!a.api_key.empty()) call.headers["Authorization"] = "Bearer " + a.api_key;
      done[i].answer = serving::CallTimed(url, call, /*stream=*/true, /*chat=*/false);
      done[i].prompt_len = static_cast<int64_t>(reqs[i].prompt.size());
    }
  };
  std::vector<std::thread> pool;
  for (int w = 0; w < workers; ++w) pool.emplace_back(work);
  for (size_t i = 0; i < reqs.size(); ++i) {  // the clock: request i becomes due at its time
    std::this_thread::sleep_until(start + std::chrono::duration_cast<Clock::duration>(
                                              std::chrono::duration<double>(reqs[i].send_at_s)));
    std::lock_guard<std::mutex> lock(mu);
    due = i + 1;
    cv.notify_one();
  }
  cv.notify_all();
  for (auto& t : pool) t.join();
  *wall_s = std::chrono::duration<double>(Clock::now() - start).count();
  return done;
}

json Stats(const std::vector<double>& v, double scale) {
  const double mean = v.empty() ? 0 : std::accumulate(v.begin(), v.end(), 0.0) / v.size();
  return {{"mean", mean * scale},
          {"p50", serving::Percentile(v, 50) * scale},
          {"p90", serving::Percentile(v, 90) * scale},
          {"p99", serving::Percentile(v, 99) * scale}};
}

json Report(const std::vector<Done>& done, double wall_s, const std::string& rate, int concurrency) {
  std::vector<double> ttft, tpot, itl, e2e;
  int64_t completed = 0, out_tokens = 0, in_tokens = 0, chunks = 0, multi = 0;
  std::string first_error;
  for (const Done& d : done) {
    const serving::TimedAnswer& t = d.answer;
    if (!t.ok) {
      if (first_error.empty()) {
        first_error = !t.http.ok() ? t.http.status().message()
                                   : std::to_string(t.http->status) + " " +
                                         t.response.dump(-1, ' ', false,
                                                         json::error_handler_t::replace)
                                             .substr(0, 500);
      }
      continue;
    }
    ++completed;
    out_tokens += t.completion_tokens;
    in_tokens += d.prompt_len;
    e2e.push_back(t.latency_s);
    if (t.ttft_s >= 0) ttft.push_back(t.ttft_s);
    if (t.ttft_s >= 0 && t.completion_tokens > 1)
      tpot.push_back((t.latency_s - t.ttft_s) / static_cast<double>(t.completion_tokens - 1));
    itl.insert(itl.end(), t.itl_s.begin(), t.itl_s.end());
    chunks += t.token_chunks;
    multi += t.multi_token_chunks;
  }
  json r = {{"request_rate", rate},
            {"max_concurrency", concurrency},
            {"completed", completed},
            {"failed", static_cast<int64_t>(done.size()) - completed},
            {"duration_s", wall_s},
            {"input_tokens", in_tokens},
            {"output_tokens", out_tokens},
            {"request_throughput", completed / wall_s},
            {"output_throughput", out_tokens / wall_s},
            {"total_token_throughput", (in_tokens + out_tokens) / wall_s},
            {"ttft_ms", Stats(ttft, 1e3)},
            {"tpot_ms", Stats(tpot, 1e3)},
            {"itl_ms", Stats(itl, 1e3)},
            {"e2e_ms", Stats(e2e, 1e3)}};
  if (chunks > 0) {  // --chunk-stats against a server that reports usage in every chunk
    r["token_chunks"] = chunks;
    r["multi_token_chunks"] = multi;
  }
  if (!first_error.empty()) r["first_error"] = first_error;
  return r;
}

void PrintRun(const json& r) {
  std::printf("rate %s, concurrency %s: %lld completed, %lld failed in %.2f s\n",
              r["request_rate"].get<std::string>().c_str(),
              r["max_concurrency"] == 0 ? "unbounded" : r["max_concurrency"].dump().c_str(),
              static_cast<long long>(r["completed"].get<int64_t>()),
              static_cast<long long>(r["failed"].get<int64_t>()), r["duration_s"].get<double>());
  std::printf("  throughput: %.2f req/s, %.1f output tok/s, %.1f total tok/s\n",
              r["request_throughput"].get<double>(), r["output_throughput"].get<double>(),
              r["total_token_throughput"].get<double>());
  std::printf("  %-6s %10s %10s %10s %10s\n", "ms", "mean", "p50", "p90", "p99");
  for (const auto& [k, label] : {std::pair{"ttft_ms", "TTFT"}, std::pair{"tpot_ms", "TPOT"},
                                 std::pair{"itl_ms", "ITL"}, std::pair{"e2e_ms", "E2E"}}) {
    const json& s = r[k];
    std::printf("  %-6s %10.2f %10.2f %10.2f %10.2f\n", label, s["mean"].get<double>(),
                s["p50"].get<double>(), s["p90"].get<double>(), s["p99"].get<double>());
  }
  if (r.contains("first_error"))
    std::printf("  first error: %s\n", r["first_error"].get<std::string>().c_str());
  if (r.contains("token_chunks")) {
    std::printf("  chunks with tokens: %lld, with more than one: %lld (%.2f%%)\n",
                static_cast<long long>(r["token_chunks"].get<int64_t>()),
                static_cast<long long>(r["multi_token_chunks"].get<int64_t>()),
                100.0 * r["multi_token_chunks"].get<double>() / r["token_chunks"].get<double>());
  }
  std::fflush(stdout);
}

// Output throughput against p99 ITL, one labelled point per rate.
std::string SweepSvg(const json& runs) {
  const double W = 640, H = 420, L = 70, R = 30, T = 40, B = 50;
  double xmax = 1e-9, ymax = 1e-9;
  for (const json& r : runs) {
    xmax = std::max(xmax, r["itl_ms"]["p99"].get<double>());
    ymax = std::max(ymax, r["output_throughput"].get<double>());
  }
  xmax *= 1.1;
  ymax *= 1.1;
  auto px = [&](double x) { return L + x / xmax * (W - L - R); };
  auto py = [&](double y) { return H - B - y / ymax * (H - T - B); };
  char buf[512];
  std::string s = "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"640\" height=\"420\" "
                  "font-family=\"sans-serif\" font-size=\"12\">\n";
  std::snprintf(buf, sizeof(buf),
                "<text x=\"%g\" y=\"24\" text-anchor=\"middle\">output tokens/s against p99 "
                "inter-token latency, one point per request rate</text>\n"
                "<line x1=\"%g\" y1=\"%g\" x2=\"%g\" y2=\"%g\" stroke=\"black\"/>\n"
                "<line x1=\"%g\" y1=\"%g\" x2=\"%g\" y2=\"%g\" stroke=\"black\"/>\n"
                "<text x=\"%g\" y=\"%g\" text-anchor=\"middle\">p99 ITL (ms), max %.1f</text>\n"
                "<text x=\"16\" y=\"%g\" transform=\"rotate(-90 16 %g)\" "
                "text-anchor=\"middle\">output tok/s, max %.0f</text>\n",
                W / 2, L, H - B, W - R, H - B, L, T, L, H - B, (L + W - R) / 2, H - 12, xmax / 1.1,
                (T + H - B) / 2, (T + H - B) / 2, ymax / 1.1);
  s += buf;
  std::string line;
  for (const json& r : runs) {
    const double x = px(r["itl_ms"]["p99"].get<double>()), y = py(r["output_throughput"].get<double>());
    std::snprintf(buf, sizeof(buf),
                  "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"4\" fill=\"steelblue\"/>\n"
                  "<text x=\"%.1f\" y=\"%.1f\">%s/s</text>\n",
                  x, y, x + 6, y - 6, r["request_rate"].get<std::string>().c_str());
    s += buf;
    std::snprintf(buf, sizeof(buf), "%s%.1f,%.1f", line.empty() ? "" : " ", x, y);
    line += buf;
  }
  s += "<polyline fill=\"none\" stroke=\"steelblue\" points=\"" + line + "\"/>\n</svg>\n";
  return s;
}

Result<double> ParseRate(const std::string& s) {
  if (s == "inf") return std::numeric_limits<double>::infinity();
  try {
    size_t used = 0;
    const double r = std::stod(s, &used);
    if (used == s.size() && r > 0 && std::isfinite(r)) return r;
  } catch (...) {
  }
  return InvalidArgument("request rate '" + s + "': a positive number of requests/s or inf");
}

Status Run(Args a) {
  ASSIGN_OR_RETURN(serving::Url url, serving::ParseUrl(a.url));
  if (a.api_key.empty()) {
    if (const char* k = std::getenv("OPENAI_API_KEY")) a.api_key = k;
  }
  for (auto* range : {&a.input_len, &a.output_len}) {
    if (range->empty() || range->size() > 2 || (*range)[0] < 1 ||
        (range->size() == 2 && (*range)[1] < (*range)[0])) {
      return InvalidArgument("--input-len/--output-len: one length >= 1, or LO,HI with LO <= HI");
    }
  }
  if (!a.extra_body.empty()) {
    auto extra = serving::ParseJsonBody(a.extra_body, serving::kMaxEmbeddedJsonDepth);
    auto* j = std::get_if<serving::RequestJson>(&extra);
    if (!j || !j->is_object())
      return InvalidArgument("--extra-body: not a JSON object (or nested too deep): " + a.extra_body);
    a.extra = *j;
  }
  const std::vector<std::string> rates = a.sweep.empty() ? std::vector{a.request_rate} : a.sweep;
  json runs = json::array();
  for (size_t k = 0; k < rates.size(); ++k) {
    ASSIGN_OR_RETURN(const double rate, ParseRate(rates[k]));
    double wall = 0;
    if (a.warmup > 0) {  // not measured: plans, graphs and caches of the shapes ahead
      Send(a, url, MakeRequests(a, a.warmup, std::numeric_limits<double>::infinity(), a.seed + 999), &wall);
    }
    const auto reqs = MakeRequests(a, a.num_prompts, rate, a.seed + k);
    const auto done = Send(a, url, reqs, &wall);
    json r = Report(done, wall, rates[k], a.concurrency);
    r["arrival_span_s"] = reqs.back().send_at_s;  // when the last request was due
    PrintRun(r);
    runs.push_back(std::move(r));
  }
  json doc = {{"url", a.url},
              {"model", a.model},
              {"num_prompts", a.num_prompts},
              {"input_len", a.input_len},
              {"output_len", a.output_len},
              {"ignore_eos", a.ignore_eos},
              {"extra_body", a.extra},
              {"runs", runs}};
  if (!a.out.empty()) std::ofstream(a.out) << doc.dump(2) << "\n";
  if (!a.svg.empty()) std::ofstream(a.svg) << SweepSvg(runs);
  for (const json& r : runs) {
    if (r["failed"].get<int64_t>() > 0) {
      return Status(StatusCode::kUnavailable,
                    std::to_string(r["failed"].get<int64_t>()) + " requests failed at rate " +
                        r["request_rate"].get<std::string>() + ": " +
                        r.value("first_error", std::string()));
    }
  }
  return OkStatus();
}

}  // namespace
}  // namespace gemma2

int main(int argc, char** argv) {
  gemma2::Args a;
  CLI::App app{"gemma2-serve-bench: serving throughput and latency of an OpenAI-compatible server"};
  app.add_option("--url", a.url, "server address, http://HOST:PORT");
  app.add_option("--model", a.model, "model name (default: the server's own default)");
  app.add_option("--api-key", a.api_key, "API key (default: $OPENAI_API_KEY)");
  app.add_option("--num-prompts", a.num_prompts, "measured requests per run")
      ->check(CLI::Range(1, 1000000));
  app.add_option("--warmup", a.warmup, "unmeasured requests before each run")
      ->check(CLI::Range(0, 100000));
  app.add_option("--input-len", a.input_len, "prompt tokens: N, or LO,HI (uniform)")
      ->delimiter(',');
  app.add_option("--output-len", a.output_len, "generated tokens: N, or LO,HI (uniform)")
      ->delimiter(',');
  app.add_option("--request-rate", a.request_rate,
                 "requests per second (Poisson arrivals), or inf (all at once)");
  app.add_option("--concurrency", a.concurrency, "most requests in flight (0: as many as arrive, up to 4096)")
      ->check(CLI::Range(0, 100000));
  app.add_option("--sweep", a.sweep, "several request rates, one run each (e.g. 1,2,4,inf)")
      ->delimiter(',');
  app.add_option("--vocab-size", a.vocab_size, "prompt ids are drawn below this")
      ->check(CLI::Range(int64_t{4}, int64_t{1} << 30));
  app.add_option("--seed", a.seed, "seed of the prompts and arrival times");
  app.add_flag("!--no-ignore-eos", a.ignore_eos,
               "let EOS end an answer early (default: ignore_eos, fixed output lengths)");
  app.add_option("--timeout", a.timeout_s, "seconds any single read may take");
  app.add_flag("--chunk-stats", a.chunk_stats,
               "ask for usage in every chunk (vLLM's continuous_usage_stats) and count the chunks "
               "that carried more than one token (tokens the server sent together)");
  app.add_option("--out", a.out, "write every run as JSON here");
  app.add_option("--svg", a.svg, "draw output throughput against p99 ITL here (with --sweep)");
  app.add_option("--extra-body", a.extra_body,
                 "a JSON object merged into every request's body (e.g. '{\"response_format\": "
                 "{\"type\": \"json_object\"}}')");
  return gemma2::RunTool("gemma2-serve-bench", app, argc, argv, [&] { return gemma2::Run(a); });
}
