// The HTTP API end to end: gemma2-launch (a coordinator and 2 worker processes, CPU backend) with
// real clients — curl, the official openai npm package, the Vercel AI SDK, LangChain JS and
// gemma2-client — on loopback. Bad input
// is answered with OpenAI's error body and the server keeps serving; a ledger of many concurrent
// streams reconciles with /metrics; disconnects free their KV blocks; SIGTERM drains.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <random>
#include <regex>
#include <set>
#include <sstream>
#include <thread>

#include "serving/http_client.h"
#include "tests/cluster_util.h"
#include "tests/test_files.h"

namespace gemma2 {
namespace {

using nlohmann::json;
using serving::HttpCall;
using Clock = std::chrono::steady_clock;

const std::string kKey = "test-key-123";

// GEMMA2_SERVER_BACKEND=cuda runs the same tests on a GPU host: one worker on the GPU (tensor
// parallelism across GPUs needs the NCCL workers), checkpoints with head_dim 128.
bool Cuda() {
  const char* b = std::getenv("GEMMA2_SERVER_BACKEND");
  return b && std::string(b) == "cuda";
}
std::string Ranks() { return Cuda() ? "--backend cuda --tp 1" : "--backend cpu --tp 2"; }
std::string Shape() {
  return Cuda() ? " --hidden 256 --heads 2 --kv-heads 1 --head-dim 128 --intermediate 512" : "";
}
std::string RunBackend() { return Cuda() ? " --backend cuda" : ""; }

std::string Bin(const std::string& name) { return std::string(GEMMA2_BINARY_DIR) + "/bin/" + name; }

// One gemma2-launch process; its ready line names the port.
class Server {
 public:
  // `shell_prefix` runs first in the launcher's shell (e.g. "ulimit -n 1024; ").
  Server(const std::string& model, const std::string& args, const std::string& shell_prefix = "") {
    int fds[2];
    EXPECT_EQ(pipe(fds), 0);
    const std::string cmd = shell_prefix + "exec " + Bin("gemma2-launch") + " --model " + model +
                            " --port 0 " + args + " 2>&1";
    pid_ = fork();
    if (pid_ == 0) {
      dup2(fds[1], 1);
      close(fds[0]);
      execl("/bin/sh", "sh", "-c", cmd.c_str(), static_cast<char*>(nullptr));
      _exit(127);
    }
    close(fds[1]);
    out_ = fdopen(fds[0], "r");
    char buf[4096];
    ready_line_ = fgets(buf, sizeof(buf), out_) ? buf : "";
    // Everything after the ready line (log lines: one per request) is read as it comes, so the
    // launcher never blocks on a full pipe; Rest() returns it.
    drain_ = std::thread([this] {
      char line[4096];
      while (fgets(line, sizeof(line), out_)) {
        std::lock_guard<std::mutex> lock(rest_mu_);
        rest_ += line;
      }
    });
    const auto at = ready_line_.rfind(':');
    if (ready_line_.find("ready") != std::string::npos && at != std::string::npos) {
      url_.host = "127.0.0.1";
      url_.port = std::atoi(ready_line_.c_str() + at + 1);
    }
  }
  ~Server() {
    if (pid_ > 0) {
      kill(pid_, SIGTERM);
      Wait();
    }
    if (drain_.joinable()) drain_.join();
    if (out_) fclose(out_);
  }
  bool ok() const { return url_.port > 0; }
  const std::string& ready_line() const { return ready_line_; }
  const serving::Url& url() const { return url_; }
  std::string base() const { return "http://127.0.0.1:" + std::to_string(url_.port); }
  pid_t pid() const { return pid_; }
  int Wait() {
    int status = 0;
    waitpid(pid_, &status, 0);
    pid_ = -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  }
  std::string Rest() {  // what it printed after the ready line (once it exited)
    if (drain_.joinable()) drain_.join();
    std::lock_guard<std::mutex> lock(rest_mu_);
    return rest_;
  }

  serving::HttpResponse Call(const std::string& method, const std::string& path,
                             const std::string& body,
                             std::map<std::string, std::string> headers = {
                                 {"Authorization", "Bearer " + kKey}}) {
    HttpCall c;
    c.method = method;
    c.path = path;
    c.body = body;
    c.headers = std::move(headers);
    c.timeout = std::chrono::seconds(60);
    auto r = serving::HttpRequest(url_, c);
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    return r.ok() ? *r : serving::HttpResponse{};
  }
  json Post(const std::string& path, const json& body, int want = 200) {
    auto r = Call("POST", path, body.dump());
    EXPECT_EQ(r.status, want) << path << " " << body.dump() << " -> " << r.body;
    return json::parse(r.body, nullptr, false);
  }
  // Samples by name and labels; every series' model_name label is checked and left out of the key.
  std::map<std::string, double> Metrics() {
    std::map<std::string, double> m;
    std::istringstream in(Call("GET", "/metrics", "").body);
    std::string line;
    while (std::getline(in, line)) {
      if (line.empty() || line[0] == '#') continue;
      const auto sp = line.rfind(' ');
      std::string key = line.substr(0, sp);
      const auto label = key.find("model_name=\"");
      EXPECT_NE(label, std::string::npos) << line;
      if (label != std::string::npos) {
        const auto close = key.find('"', label + 12);
        const bool alone = key[close + 1] == '}';
        key.erase(label - (alone ? 1 : 0), close + 1 - label + (alone ? 2 : 1));
      }
      m[key] = std::atof(line.c_str() + sp + 1);
    }
    return m;
  }

 private:
  pid_t pid_ = -1;
  FILE* out_ = nullptr;
  std::thread drain_;
  std::mutex rest_mu_;
  std::string rest_;
  std::string ready_line_;
  serving::Url url_;
};

class ServerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new testing::TempDir();
    const std::string corpus = std::string(GEMMA2_SOURCE_DIR) + "/tools/demo_corpus.txt";
    int code = 0;
    Shell(Bin("gemma2-make-checkpoint") + " --out " + Lm() + " --corpus " + corpus + " --seed 3" +
              Shape() + " 2>&1",
          &code);
    ASSERT_EQ(code, 0);
    Shell(Bin("gemma2-make-checkpoint") + " --out " + Cls() +
              " --vocab 64 --arch seqcls --labels 3" + Shape() + " 2>&1",
          &code);
    ASSERT_EQ(code, 0);
    std::ofstream(dir_->path() / "key") << kKey << "\n";
    server_ = new Server(Lm(), Ranks() + " --api-key-file " + (dir_->path() / "key").string() +
                                   " --max-body-bytes 65536 --strict-fields");
    ASSERT_TRUE(server_->ok()) << server_->ready_line();
  }
  // Every test fails at once, with the launcher's words, when the shared server did not start.
  void SetUp() override {
    ASSERT_TRUE(server_ != nullptr && server_->ok())
        << "the shared gemma2-launch did not start: " << (server_ ? server_->ready_line() : "");
  }
  static void TearDownTestSuite() {
    delete server_;
    delete dir_;
  }
  static std::string Lm() { return (dir_->path() / "lm").string(); }
  static std::string Cls() { return (dir_->path() / "cls").string(); }
  static std::string Curl(const std::string& args) {
    return Shell("curl -sS --max-time 60 -H 'Authorization: Bearer " + kKey +
                 "' -H 'Content-Type: application/json' " + args + " 2>&1");
  }
  static testing::TempDir* dir_;
  static Server* server_;
};
testing::TempDir* ServerTest::dir_ = nullptr;
Server* ServerTest::server_ = nullptr;

TEST_F(ServerTest, CurlCompletionsBatchesChatStreamsAndModels) {
  const std::string url = server_->base();
  json models = json::parse(Curl(url + "/v1/models"));
  ASSERT_EQ(models["data"].size(), 1u) << models;
  const std::string model = models["data"][0]["id"];
  EXPECT_EQ(model, "lm");

  json one = json::parse(Curl(
      url +
      "/v1/completions -d '{\"model\":\"lm\",\"prompt\":\"Hello, my name is\",\"max_tokens\":6,"
      "\"min_tokens\":6}'"));  // sampled: min_tokens keeps a drawn EOS from ending it sooner
  ASSERT_EQ(one["choices"].size(), 1u) << one;
  EXPECT_EQ(one["object"], "text_completion");
  EXPECT_EQ(one["usage"]["completion_tokens"], 6);
  EXPECT_EQ(one["usage"]["total_tokens"], one["usage"]["prompt_tokens"].get<int>() + 6);

  json batch = json::parse(
      Curl(url + "/v1/completions -d '{\"prompt\":[\"a b\",\"c\",[2,40,41]],\"max_tokens\":3,"
                 "\"n\":2,\"temperature\":0,\"return_token_ids\":true}'"));
  ASSERT_EQ(batch["choices"].size(), 6u) << batch;  // 3 prompts x n 2, OpenAI's index order
  for (int i = 0; i < 6; ++i) EXPECT_EQ(batch["choices"][i]["index"], i);
  EXPECT_EQ(batch["choices"][4]["prompt_token_ids"], json::array({2, 40, 41}));
  EXPECT_EQ(batch["choices"][4]["token_ids"],
            batch["choices"][5]["token_ids"]);  // greedy: equal choices

  json chat = json::parse(
      Curl(url + "/v1/chat/completions -d '{\"messages\":[{\"role\":\"user\",\"content\":\"Hi\"}],"
                 "\"max_tokens\":4}'"));
  EXPECT_EQ(chat["object"], "chat.completion");
  EXPECT_EQ(chat["choices"][0]["message"]["role"], "assistant");

  const std::string sse =
      Curl("-N " + url +
           "/v1/chat/completions -d '{\"messages\":[{\"role\":\"user\",\"content\":"
           "\"Hi\"}],\"max_tokens\":4,\"min_tokens\":4,\"stream\":true,"
           "\"stream_options\":{\"include_usage\":true}}'");  // sampled: no end_of_turn before 4
  EXPECT_EQ(sse.rfind("data: [DONE]\n\n"), sse.size() - 14) << sse;
  EXPECT_NE(sse.find("\"role\":\"assistant\""), std::string::npos);
  EXPECT_NE(sse.find("\"usage\":{\"completion_tokens\":4"), std::string::npos) << sse;

  // curl announces a large body with "Expect: 100-continue": one over the size cap is refused at
  // once (413) without being sent, instead of after curl's one-second wait and the upload.
  const std::string huge = (dir_->path() / "huge.json").string();
  std::ofstream(huge) << "{\"prompt\": \"" << std::string(5 << 20, 'x') << "\"}";
  const auto t0 = std::chrono::steady_clock::now();
  const std::string refused = Curl("-w ' %{http_code}' " + url + "/v1/completions --data @" + huge);
  const double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_NE(refused.find("larger than the limit"), std::string::npos) << refused;
  EXPECT_NE(refused.find(" 413"), std::string::npos) << refused;
  EXPECT_LT(took, 0.9);

  // X-Request-Id is echoed, or made.
  const std::string head = Curl("-i " + url + "/health -H 'X-Request-Id: my-id-7'");
  EXPECT_NE(head.find("X-Request-Id: my-id-7"), std::string::npos) << head;
  EXPECT_NE(Curl("-i " + url + "/v1/models").find("X-Request-Id: "), std::string::npos);
}

TEST_F(ServerTest, ClassifyServesASequenceClassifier) {
  Server cls(Cls(), Ranks());
  ASSERT_TRUE(cls.ok()) << cls.ready_line();
  json r = json::parse(
      Shell("curl -sS --max-time 60 " + cls.base() +
            "/v1/classify -H 'Content-Type: application/json' -d '{\"input\":[[3,4,5],[9,0,0]]}'"));
  ASSERT_EQ(r["data"].size(), 2u) << r;
  for (const auto& d : r["data"]) {
    EXPECT_EQ(d["probs"].size(), 3u);
    EXPECT_EQ(d["logits"].size(), 3u);
    double sum = 0;
    for (double p : d["probs"]) sum += p;
    EXPECT_NEAR(sum, 1.0, 1e-6);
    EXPECT_TRUE(d["label"].is_string());
  }
  // The same numbers as the offline runner.
  int code = 0;
  json offline = json::parse(
      Shell(Bin("gemma2-run") + RunBackend() + " --model " + Cls() + " --prompt-ids 3,4,5", &code));
  ASSERT_EQ(code, 0);
  for (int k = 0; k < 3; ++k)
    EXPECT_NEAR(r["data"][0]["logits"][k].get<double>(), offline["logits"][0][k].get<double>(),
                1e-5)
        << offline;
  // A token classifier: one scored row per input token.
  const std::string tok_model = (dir_->path() / "tokcls").string();
  int made = 0;
  Shell(Bin("gemma2-make-checkpoint") + " --out " + tok_model +
            " --vocab 64 --arch tokcls --labels 4" + Shape() + " 2>&1",
        &made);
  ASSERT_EQ(made, 0);
  Server tok(tok_model, Ranks());
  ASSERT_TRUE(tok.ok()) << tok.ready_line();
  auto t = tok.Call("POST", "/v1/classify", R"({"input": [3, 4, 5, 6, 7]})", {});
  ASSERT_EQ(t.status, 200) << t.body;
  const json tj = json::parse(t.body);
  ASSERT_EQ(tj["data"][0]["tokens"].size(), 5u) << tj;
  EXPECT_EQ(tj["data"][0]["tokens"][4]["token_id"], 7);
  EXPECT_EQ(tj["data"][0]["tokens"][4]["probs"].size(), 4u);
  int code2 = 0;
  const json off = json::parse(
      Shell(Bin("gemma2-run") + RunBackend() + " --model " + tok_model + " --prompt-ids 3,4,5,6,7",
            &code2));
  ASSERT_EQ(code2, 0);
  for (int row = 0; row < 5; ++row) {
    for (int k = 0; k < 4; ++k) {
      EXPECT_NEAR(tj["data"][0]["tokens"][row]["logits"][k].get<double>(),
                  off["logits"][row][k].get<double>(), 1e-5);
    }
  }
  // A generation route on a classifier is a clear 400.
  auto bad = cls.Call("POST", "/v1/completions", R"({"prompt":[3]})", {});
  EXPECT_EQ(bad.status, 400);
  EXPECT_NE(bad.body.find("is a classifier"), std::string::npos) << bad.body;
}

TEST_F(ServerTest, GreedyThroughTheServerEqualsGemma2Run) {
  std::ifstream prompts(std::string(GEMMA2_SOURCE_DIR) + "/tools/demo_prompts.txt");
  std::string prompt;
  int checked = 0, echoes = 0;
  std::set<std::string> distinct;
  while (std::getline(prompts, prompt)) {
    int code = 0;
    const json offline = json::parse(Shell(Bin("gemma2-run") + RunBackend() + " --model " + Lm() +
                                               " --max-new-tokens 12 --prompt '" + prompt + "'",
                                           &code));
    ASSERT_EQ(code, 0);
    const json served = server_->Post(
        "/v1/completions",
        {{"prompt", prompt}, {"max_tokens", 12}, {"temperature", 0}, {"return_token_ids", true}});
    const json& c = served["choices"][0];
    EXPECT_EQ(c["prompt_token_ids"], offline["prompt_ids"]) << prompt;
    EXPECT_EQ(c["token_ids"], offline["generated_ids"]) << prompt;
    EXPECT_EQ(c["text"], offline["text"]) << prompt;
    EXPECT_EQ(c["finish_reason"], offline["finish_reason"]) << prompt;
    ++checked;
    distinct.insert(offline["generated_ids"].dump());
    // The test model must not answer every prompt by repeating its last token (token equality
    // would then prove nothing).
    const json& gen = offline["generated_ids"];
    if (std::all_of(gen.begin(), gen.end(), [&](const json& t) { return t == offline["prompt_ids"].back(); }))
      ++echoes;
  }
  EXPECT_GE(checked, 4);
  EXPECT_EQ(distinct.size(), static_cast<size_t>(checked)) << "greedy outputs must vary with the prompt";
  EXPECT_EQ(echoes, 0);
}

// Chat with n > 1 and logprobs, streamed and not: OpenAI's shapes, the same tokens either way.
TEST_F(ServerTest, ChatLogprobsAndSeveralChoicesStreamed) {
  const json body = {{"messages", {{{"role", "user"}, {"content", "Tell me about the sea"}}}},
                     {"max_tokens", 5},
                     {"n", 2},
                     {"temperature", 0.9},
                     {"seed", 3},
                     {"logprobs", true},
                     {"top_logprobs", 3}};
  const json whole = server_->Post("/v1/chat/completions", body);
  ASSERT_EQ(whole["choices"].size(), 2u) << whole;
  for (const auto& c : whole["choices"]) {
    const auto& content = c["logprobs"]["content"];
    ASSERT_EQ(content.size(), 5u) << c;
    for (const auto& t : content) {
      EXPECT_LE(t["logprob"].get<double>(), 0.0);
      ASSERT_EQ(t["top_logprobs"].size(), 3u);
      EXPECT_GE(t["top_logprobs"][0]["logprob"].get<double>(),
                t["top_logprobs"][2]["logprob"].get<double>());
      EXPECT_TRUE(t["bytes"].is_array());
    }
  }
  json streamed = body;
  streamed["stream"] = true;
  HttpCall call{
      "POST", "/v1/chat/completions", streamed.dump(), {{"Authorization", "Bearer " + kKey}}};
  std::vector<std::string> text(2);
  std::vector<int> logprob_tokens(2, 0);
  auto r = serving::HttpStream(server_->url(), call, [&](std::string_view data) {
    if (data == "[DONE]") return true;
    const json chunk = json::parse(data);
    for (const auto& c : chunk["choices"]) {
      const size_t i = c["index"];
      text[i] += c["delta"].value("content", "");
      if (!c["logprobs"].is_null())
        logprob_tokens[i] += static_cast<int>(c["logprobs"]["content"].size());
    }
    return true;
  });
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_EQ(text[i], whole["choices"][i]["message"]["content"]) << i;
    EXPECT_EQ(logprob_tokens[i], 5) << i;
  }
}

// Through the cluster: a repeated long prompt reuses the cached prefix (copied on every rank) and
// answers exactly as before.
TEST_F(ServerTest, RepeatedPromptsReuseTheCachedPrefix) {
  std::string prompt;
  for (int i = 0; i < 40; ++i) prompt += "word" + std::to_string(i % 7) + " ";
  const json body = {
      {"prompt", prompt}, {"max_tokens", 6}, {"temperature", 0}, {"return_token_ids", true}};
  const json first = server_->Post("/v1/completions", body);
  const double hits = server_->Metrics()["gemma2_prefix_cache_hit_tokens_total"];
  const json second = server_->Post("/v1/completions", body);
  const double reused = server_->Metrics()["gemma2_prefix_cache_hit_tokens_total"] - hits;
  const int prompt_tokens = first["usage"]["prompt_tokens"];
  EXPECT_EQ(reused, (prompt_tokens - 1) / 16 * 16) << prompt_tokens;  // whole 16-token blocks
  EXPECT_GE(reused, 16);
  EXPECT_EQ(second["choices"][0]["token_ids"], first["choices"][0]["token_ids"]);
  EXPECT_EQ(second["choices"][0]["text"], first["choices"][0]["text"]);
}

// Two pipeline stages: a batch goes through in micro-batches (stage 0 runs the second while stage 1
// runs the first), or as two steps in flight over halves of the batch (pipelined decode), and
// gives exactly what one step at a time in one micro-batch gives.
TEST_F(ServerTest, PipelineMicroBatchesGiveTheSameAnswers) {
  if (Cuda()) GTEST_SKIP() << "pipeline stages on GPUs need the NCCL workers";
  const json body = {{"prompt", {"The sea", "A cluster of GPUs", "Hello, my name is", "x y z"}},
                     {"max_tokens", 8},
                     {"n", 2},
                     {"temperature", 0.8},
                     {"seed", 5},
                     {"return_token_ids", true}};
  std::vector<json> answers;
  for (const char* micro :
       {"--micro-batches 1 --pipeline-depth 1", "--micro-batches 2 --pipeline-depth 1",
        "--micro-batches 3 --pipeline-depth 1", "--micro-batches 1", "--micro-batches 2",
        "--micro-batches 1 --pipeline-depth 3"}) {
    Server s(Lm(),
             std::string("--backend cpu --tp 1 --nodes 2 --micro-batch-min-tokens 1 ") + micro);
    ASSERT_TRUE(s.ok()) << s.ready_line();
    auto r = s.Call("POST", "/v1/completions", body.dump(), {});
    ASSERT_EQ(r.status, 200) << r.body;
    answers.push_back(json::parse(r.body)["choices"]);
  }
  ASSERT_EQ(answers[0].size(), 8u);
  for (size_t i = 1; i < answers.size(); ++i) {
    for (size_t c = 0; c < 8; ++c)
      EXPECT_EQ(answers[i][c]["token_ids"], answers[0][c]["token_ids"]) << i << " " << c;
  }
}

// Streamed pieces concatenated are the non-streamed text (stop strings included), and no chunk
// carries a broken UTF-8 character (it would show as U+FFFD).
TEST_F(ServerTest, StreamedTextEqualsTheUnstreamedText) {
  for (const json& extra : {json::object(), json{{"stop", {"e", "th"}}}, json{{"logprobs", 2}}}) {
    json body = {{"prompt", "The quick brown fox"}, {"max_tokens", 24}, {"temperature", 0}};
    if (extra.is_object()) body.update(extra);
    const json whole = server_->Post("/v1/completions", body);
    body["stream"] = true;
    HttpCall call{"POST", "/v1/completions", body.dump(), {{"Authorization", "Bearer " + kKey}}};
    std::string text;
    bool done = false;
    auto r = serving::HttpStream(server_->url(), call, [&](std::string_view data) {
      if (data == "[DONE]") {
        done = true;
        return true;
      }
      EXPECT_EQ(data.find("\\ufffd"), std::string_view::npos);
      json chunk = json::parse(data);
      text += chunk["choices"][0]["text"].get<std::string>();
      return true;
    });
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_TRUE(done);
    EXPECT_EQ(text, whole["choices"][0]["text"]) << extra;
    if (extra.contains("stop")) {
      const std::string t = text;
      EXPECT_EQ(t.find('e'), std::string::npos) << t;
    }
  }
}

// Each bad request gets OpenAI's error body with the right status, and the next request works.
// A body of megabytes is parsed and tokenized off the I/O thread: while a 3 MB prompt is being
// tokenized (seconds on a small machine), another connection's /health answers at once.
TEST_F(ServerTest, AHugePromptDoesNotStallOtherConnections) {
  Server s(Lm(), Ranks());
  ASSERT_TRUE(s.ok()) << s.ready_line();
  std::ifstream corpus(std::string(GEMMA2_SOURCE_DIR) + "/tools/demo_corpus.txt");
  std::vector<std::string> words{std::istream_iterator<std::string>(corpus), {}};
  ASSERT_FALSE(words.empty());
  std::string prompt;
  for (size_t i = 0; prompt.size() < 3'000'000; ++i) prompt += words[i % words.size()] + " ";
  const std::string body = json{{"prompt", prompt}, {"max_tokens", 1}}.dump();
  double big_s = 0;
  int big_status = 0;
  std::thread big([&] {
    const auto t0 = std::chrono::steady_clock::now();
    big_status = s.Call("POST", "/v1/completions", body, {}).status;
    big_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(300));  // the body is in by now
  const auto t0 = std::chrono::steady_clock::now();
  const auto health = s.Call("GET", "/health", "", {});
  const double health_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  big.join();
  EXPECT_EQ(health.status, 200);
  EXPECT_EQ(big_status, 400);  // far longer than the context
  ASSERT_GT(big_s, 0.6) << "tokenizing took too little time to show a stall";
  EXPECT_LT(health_s, big_s / 4) << "health " << health_s << " s during a " << big_s << " s parse";
}

TEST_F(ServerTest, EveryBadInputIsAnErrorAndTheServerKeepsServing) {
  const std::string big(70000, ' ');
  struct Case {
    std::string path, body;
    int status;
    std::string message;
    std::map<std::string, std::string> headers = {{"Authorization", "Bearer " + kKey}};
  };
  const std::vector<Case> cases = {
      {"/v1/completions", R"({"prompt": "x", "max_tokens": 3)", 400, "malformed JSON"},
      {"/v1/completions", "{\"prompt\": \"\xc3\x28\"}", 400, "invalid UTF-8"},
      {"/v1/completions", std::string(40, '[') + std::string(40, ']'), 400, "nested deeper"},
      {"/v1/completions", R"({"prompt": 5})", 400, "'prompt' must be"},
      {"/v1/completions", R"({"prompt": "x", "max_tokens": "3"})", 400, "must be an integer"},
      {"/v1/completions", R"({"prompt": "x", "frobnicate": true})", 400,
       "unknown field 'frobnicate'"},
      {"/v1/completions", R"({"prompt": ""})", 400, "empty prompt"},
      {"/v1/chat/completions", R"({"messages": []})", 400, "'messages' is empty"},
      {"/v1/completions", R"({"prompt": "x", "max_tokens": 100000})", 400, "tokens were requested"},
      {"/v1/completions", R"({"prompt": [2, 5000]})", 400,
       "token id 5000 is outside the vocabulary"},
      {"/v1/completions", R"({"prompt": "x", "stop_token_ids": [-1]})", 400, "token id -1"},
      {"/v1/completions", R"({"prompt": "x", "max_tokens": 0})", 400, "'max_tokens' must be >= 1"},
      {"/v1/completions", R"({"prompt": "x", "temperature": -1})", 400,
       "'temperature' must be >= 0"},
      {"/v1/completions", R"({"prompt": "x", "top_p": 1.01})", 400, "'top_p' must be in (0, 1]"},
      {"/v1/completions", R"({"prompt": "x", "top_k": -5})", 400, "'top_k'"},
      {"/v1/completions", R"({"prompt": "x", "n": 1000})", 400, "'n' is 1000; the limit is 16"},
      {"/v1/completions", R"({"prompt": "x", "logprobs": 50})", 400, "the limit is 20"},
      {"/v1/completions", R"({"prompt": "x", "stop": [""]})", 400, "must not be empty"},
      {"/v1/completions", "{\"prompt\": \"" + big + "\"}", 413,
       "larger than the limit of 65536 bytes"},
      {"/v1/completions", R"({"prompt": "x", "model": "gpt-4"})", 404, "'gpt-4' does not exist"},
      {"/v1/nothing", R"({})", 404, "no route /v1/nothing"},
      {"/v1/completions", R"({"prompt": "x"})", 401, "missing API key", {}},
      {"/v1/completions", R"({"prompt": "x"})", 401, "wrong", {{"Authorization", "Bearer nope"}}},
      {"/v1/completions",
       R"({"prompt": "x"})",
       415,
       "Content-Type",
       {{"Authorization", "Bearer " + kKey}, {"Content-Type", "text/plain"}}},
  };
  for (const auto& k : cases) {
    auto r = server_->Call("POST", k.path, k.body, k.headers);
    EXPECT_EQ(r.status, k.status) << k.body.substr(0, 80) << " -> " << r.body;
    json e = json::parse(r.body, nullptr, false);
    ASSERT_TRUE(e.contains("error")) << r.body;
    for (const char* field : {"message", "type", "param", "code"})
      EXPECT_TRUE(e["error"].contains(field)) << r.body;
    EXPECT_NE(e["error"]["message"].get<std::string>().find(k.message), std::string::npos)
        << r.body;
    // The very next request is served.
    const json ok = server_->Post("/v1/completions", {{"prompt", "ok"}, {"max_tokens", 2}});
    EXPECT_EQ(ok["choices"].size(), 1u) << "after " << k.body.substr(0, 80);
  }
  // /health and /ready need no key; everything else does.
  EXPECT_EQ(server_->Call("GET", "/health", "", {}).status, 200);
  EXPECT_EQ(server_->Call("GET", "/ready", "", {}).status, 200);
  EXPECT_EQ(server_->Call("GET", "/metrics", "", {}).status, 401);
  EXPECT_EQ(server_->Call("GET", "/v1/models", "", {}).status, 401);
  EXPECT_EQ(server_->Call("GET", "/v1/completions", "").status, 405);
  // The scheme name is case-insensitive (RFC 7235); the key is not.
  EXPECT_EQ(server_->Call("GET", "/v1/models", "", {{"Authorization", "bearer " + kKey}}).status, 200);
  EXPECT_EQ(server_->Call("GET", "/v1/models", "", {{"Authorization", "BEARER " + kKey}}).status, 200);
  std::string upper = kKey;
  for (char& c : upper) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  EXPECT_EQ(server_->Call("GET", "/v1/models", "", {{"Authorization", "Bearer " + upper}}).status, 401);
}

// Every numeric field at and past the edges of float32, int32 and int64 (subnormals, negative
// zero, huge and tiny magnitudes): each is a 400 naming that field or a well-formed answer, and
// afterwards the server still gives the same greedy tokens as before. Tiny temperatures sample
// as greedy (kMinSamplingTemperature), never as a wrong token.
TEST_F(ServerTest, NumericEdgesAreRefusedByNameOrServedAndNothingBreaks) {
  const json probe = {{"prompt", "Hello, my name is"}, {"max_tokens", 6}, {"temperature", 0},
                      {"return_token_ids", true}};
  const json before = server_->Post("/v1/completions", probe)["choices"][0]["token_ids"];
  ASSERT_EQ(before.size(), 6u);
  const std::vector<std::string> floats = {
      "0",     "-0.0",    "1e-46", "4.9e-324", "1e-40", "1e-38", "1.17549435e-38", "3.4e38",
      "3.5e38", "1e39",   "1e308", "-1e39",    "-1",    "1",     "0.5",            "2",
      "10",    "10.0001", "-2.0000001"};
  const std::vector<std::string> ints = {"0",          "-1",          "1",
                                         "2147483647", "2147483648",  "-2147483649",
                                         "4294967296", "9223372036854775807",
                                         "-9223372036854775808", "18446744073709551615",
                                         "1.5",        "1e3"};
  struct Field {
    std::string name, route;
    const std::vector<std::string>* values;
    std::string wrap = "";  // "list": the value inside a list
  };
  const std::vector<Field> fields = {
      {"temperature", "/v1/completions", &floats},
      {"top_p", "/v1/completions", &floats},
      {"min_p", "/v1/completions", &floats},
      {"presence_penalty", "/v1/completions", &floats},
      {"frequency_penalty", "/v1/completions", &floats},
      {"repetition_penalty", "/v1/completions", &floats},
      {"top_k", "/v1/completions", &ints},
      {"seed", "/v1/completions", &ints},
      {"max_tokens", "/v1/completions", &ints},
      {"n", "/v1/completions", &ints},
      {"logprobs", "/v1/completions", &ints},
      {"top_logprobs", "/v1/chat/completions", &ints},
      {"max_completion_tokens", "/v1/chat/completions", &ints},
      {"stop_token_ids", "/v1/completions", &ints, "list"},
      {"prompt", "/v1/completions", &ints, "list"},
      {"prompt_logprobs", "/v1/completions", &ints},
      {"min_tokens", "/v1/completions", &ints},
      {"truncate_prompt_tokens", "/v1/completions", &ints},
      {"allowed_token_ids", "/v1/completions", &ints, "list"},
  };
  int refused = 0, served = 0;
  for (const Field& f : fields) {
    for (const std::string& v : *f.values) {
      const std::string value = f.wrap == "list" ? "[" + v + "]" : v;
      std::string body = f.route == "/v1/completions"
                             ? R"({"max_tokens": 2, "prompt": "x")"
                             : R"({"max_tokens": 2, "messages": [{"role": "user", "content": "x"}])";
      if (f.name == "top_logprobs") body += R"(, "logprobs": true)";
      if (f.name == "max_tokens" || f.name == "max_completion_tokens" || f.name == "prompt") {
        body = f.route == "/v1/completions" ? "{" : R"({"messages": [{"role": "user", "content": "x"}])";
        if (f.name != "prompt" && f.route == "/v1/completions") body += R"("prompt": "x")";
        if (f.name == "prompt") body += R"("max_tokens": 2)";
      }
      body += ", \"" + f.name + "\": " + value + "}";
      const auto r = server_->Call("POST", f.route, body);
      const json j = json::parse(r.body, nullptr, false);
      ASSERT_FALSE(j.is_discarded()) << body << " -> " << r.body;
      if (r.status == 400) {
        ++refused;
        // Numbers beyond what JSON parsing keeps exactly may fail as malformed JSON (no field);
        // everything else names the field.
        const json& param = j["error"]["param"];
        if (!(param.is_string() && param == f.name)) {
          EXPECT_NE(r.body.find("malformed JSON"), std::string::npos) << body << " -> " << r.body;
        }
        continue;
      }
      EXPECT_EQ(r.status, 200) << body << " -> " << r.body;
      if (r.status != 200) continue;
      ++served;
      ASSERT_TRUE(j["choices"].is_array()) << body << " -> " << r.body;
      for (const auto& c : j["choices"]) {
        EXPECT_TRUE(c["finish_reason"] == "length" || c["finish_reason"] == "stop")
            << body << " -> " << r.body;
      }
    }
  }
  EXPECT_GT(refused, 50);
  EXPECT_GT(served, 50);
  // Tiny temperatures are greedy draws, whatever the seed.
  for (const double t : {1e-38, 1e-40, 1e-6}) {
    json p = probe;
    p["temperature"] = t;
    p["seed"] = 11;
    EXPECT_EQ(server_->Post("/v1/completions", p)["choices"][0]["token_ids"], before) << t;
  }
  EXPECT_EQ(server_->Post("/v1/completions", probe)["choices"][0]["token_ids"], before);
  EXPECT_EQ(server_->Call("GET", "/ready", "", {}).status, 200);
}

// 2000 idle connections against a launcher limited to 1024 descriptors: past --max-connections
// (by default that limit less 128) the connections idle longest are closed to admit new ones;
// /health answers within 1 s throughout, the launcher stays nearly idle, no descriptor runs out,
// and afterwards it serves as before.
TEST_F(ServerTest, ConnectionFloodIsCappedAndHealthStaysFast) {
  rlimit lim{};
  getrlimit(RLIMIT_NOFILE, &lim);
  lim.rlim_cur = std::min<rlim_t>(lim.rlim_max, 8192);
  setrlimit(RLIMIT_NOFILE, &lim);
  if (lim.rlim_cur < 2200) GTEST_SKIP() << "skipped: this process may open only " << lim.rlim_cur << " descriptors";
  Server s(Lm(), Ranks(), "ulimit -n 1024; ");
  ASSERT_TRUE(s.ok()) << s.ready_line();
  std::vector<int> held;
  auto health_ms = [&] {
    const auto t0 = Clock::now();
    EXPECT_EQ(s.Call("GET", "/health", "", {}).status, 200);
    return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
  };
  double worst = 0;
  for (int i = 0; i < 2000; ++i) {
    const int fd = DialLoopback(s.url().port);
    ASSERT_GE(fd, 0) << "connection " << i;
    held.push_back(fd);
    if (i % 250 == 0) worst = std::max(worst, health_ms());
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  int closed = 0;  // by the server: EOF
  for (int fd : held) {
    char buf[64] = {};
    if (recv(fd, buf, sizeof(buf) - 1, MSG_DONTWAIT) == 0) ++closed;
  }
  const double cpu0 = ProcessCpuSeconds(s.pid());
  for (int i = 0; i < 8; ++i) {
    worst = std::max(worst, health_ms());
    std::this_thread::sleep_for(std::chrono::milliseconds(250));
  }
  const double cpu = ProcessCpuSeconds(s.pid()) - cpu0;
  std::printf("2000 connections: %d closed by the server, worst /health %.1f ms, launcher CPU %.2f s in ~2 s\n",
              closed, worst, cpu);
  EXPECT_GE(closed, 2000 - (1024 - 128));
  EXPECT_LE(closed, 2000 - 700);  // the cap's worth stays open
  EXPECT_LT(worst, 1000);
  EXPECT_LT(cpu, 0.4);  // < 20% of one core
  for (int fd : held) close(fd);
  EXPECT_GT(s.Metrics()["gemma2_connections_evicted_total"], 1000);
  const json ok = s.Post("/v1/completions", {{"prompt", "ok"}, {"max_tokens", 2}});
  EXPECT_EQ(ok["choices"].size(), 1u);
}

// --in-process serves from an engine in the launcher's own process (no workers, no control
// plane): the same greedy answers as the cluster, token for token, prompts giving different ones.
TEST_F(ServerTest, InProcessEngineAnswersAsTheCluster) {
  Server cluster(Lm(), "--tp 1");
  Server local(Lm(), "--tp 1 --in-process");
  ASSERT_TRUE(cluster.ok()) << cluster.ready_line();
  ASSERT_TRUE(local.ok()) << local.ready_line();
  EXPECT_NE(local.ready_line().find("in process"), std::string::npos) << local.ready_line();
  std::set<std::string> distinct;
  for (const char* prompt : {"a", "the quick", "0 1 2 3", "zzz"}) {
    const json body = {{"prompt", prompt}, {"max_tokens", 8}, {"temperature", 0}, {"ignore_eos", true},
                       {"return_token_ids", true}};
    const json want = cluster.Post("/v1/completions", body)["choices"][0]["token_ids"];
    const json got = local.Post("/v1/completions", body)["choices"][0]["token_ids"];
    EXPECT_EQ(got, want) << prompt;
    distinct.insert(want.dump());
  }
  EXPECT_GE(distinct.size(), 2u);  // the test model's answers depend on the prompt
}

// When every connection is busy with a request, a new one is answered 503 at once.
TEST_F(ServerTest, PastTheConnectionCapWithEveryConnectionBusyIs503) {
  Server s(Lm(), Ranks() + " --max-connections 2");
  ASSERT_TRUE(s.ok()) << s.ready_line();
  std::vector<int> busy;
  const std::string body = json{{"prompt", "busy"}, {"max_tokens", 4000}, {"ignore_eos", true},
                                {"stream", true}}.dump();
  for (int i = 0; i < 2; ++i) {
    const int fd = DialLoopback(s.url().port);
    const std::string req = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            "Content-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body;
    ASSERT_EQ(send(fd, req.data(), req.size(), MSG_NOSIGNAL), static_cast<ssize_t>(req.size()));
    char buf[16];
    ASSERT_GT(recv(fd, buf, sizeof(buf), 0), 0);  // its stream has started
    busy.push_back(fd);
  }
  const int third = DialLoopback(s.url().port);
  std::string got(256, '\0');
  timeval tv{5, 0};
  setsockopt(third, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  const ssize_t n = recv(third, got.data(), got.size(), 0);
  ASSERT_GT(n, 0);
  got.resize(static_cast<size_t>(n));
  EXPECT_EQ(got.rfind("HTTP/1.1 503", 0), 0u) << got;
  close(third);
  for (int fd : busy) close(fd);
}

// A streaming client that never reads: once the server's writes stall for --write-timeout, the
// connection is cut, the request cancelled and its sequences freed; others are served meanwhile.
TEST_F(ServerTest, AClientThatStopsReadingIsCutAfterTheWriteTimeout) {
  Server s(Lm(), Ranks() + " --write-timeout 2");
  ASSERT_TRUE(s.ok()) << s.ready_line();
  const int fd = DialLoopback(s.url().port, 4096);
  ASSERT_GE(fd, 0);
  // Far more than any socket buffer holds (16 x 8000 events of ~2 KB; a GPU makes them in
  // seconds, and some hosts buffer tens of MB per socket).
  const std::string body = json{{"prompt", "never read"}, {"max_tokens", 8000}, {"n", 16},
                                {"logprobs", 20}, {"ignore_eos", true}, {"stream", true}}
                               .dump();
  const std::string req = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          "Content-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body;
  ASSERT_EQ(send(fd, req.data(), req.size(), MSG_NOSIGNAL), static_cast<ssize_t>(req.size()));
  const auto t0 = Clock::now();
  double cancelled = 0;
  while (Clock::now() - t0 < std::chrono::seconds(60)) {
    cancelled = s.Metrics()["gemma2_requests_total{outcome=\"cancelled\"}"];
    if (cancelled >= 1) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  EXPECT_EQ(cancelled, 1);
  for (int i = 0; i < 50 && s.Metrics()["gemma2_running_sequences"] > 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_EQ(s.Metrics()["gemma2_running_sequences"], 0);
  close(fd);
  const json ok = s.Post("/v1/completions", {{"prompt", "ok"}, {"max_tokens", 2}});
  EXPECT_EQ(ok["choices"].size(), 1u);
}

// A message's name is honoured (the turn says who speaks: "NAME: content"), not dropped; and
// stream_options.continuous_usage_stats puts the usage so far in every chunk.
TEST_F(ServerTest, MessageNamesAndContinuousUsageAreHonoured) {
  auto chat = [&](json message) {
    return server_->Post("/v1/chat/completions",
                         {{"messages", json::array({message})}, {"max_tokens", 2}, {"temperature", 0}});
  };
  const json plain = chat({{"role", "user"}, {"content", "Hi"}});
  const json named = chat({{"role", "user"}, {"content", "Hi"}, {"name", "Ann"}});
  EXPECT_GT(named["usage"]["prompt_tokens"].get<int>(), plain["usage"]["prompt_tokens"].get<int>());
  const json tokenized = chat({{"role", "user"}, {"content", "Ann: Hi"}});
  EXPECT_EQ(named["usage"]["prompt_tokens"], tokenized["usage"]["prompt_tokens"]);
  const std::string sse = Curl(
      "-N " + server_->base() +
      "/v1/completions -d '{\"prompt\": \"Hello\", \"max_tokens\": 4, \"ignore_eos\": true, "
      "\"stream\": true, \"stream_options\": {\"continuous_usage_stats\": true}}'");
  std::istringstream lines(sse);
  std::vector<int> completion;
  for (std::string line; std::getline(lines, line);) {
    if (line.rfind("data: {", 0) != 0) continue;
    const json chunk = json::parse(line.substr(6));
    ASSERT_TRUE(chunk.contains("usage")) << line;
    completion.push_back(chunk["usage"]["completion_tokens"].get<int>());
  }
  ASSERT_FALSE(completion.empty()) << sse;
  EXPECT_TRUE(std::is_sorted(completion.begin(), completion.end()));
  EXPECT_EQ(completion.back(), 4) << sse;
}

// vLLM's /tokenize and /detokenize round-trip Gemma's real vocabulary (../shared/tokenizers) on a
// tiny model that carries it; chat tokenization counts what a chat completion's usage counts.
// Also /version, /v1/models/{id}, /classify (the alias) and --metrics-open.
TEST_F(ServerTest, TokenizeDetokenizeVersionAndModelRoutes) {
  const std::filesystem::path vocab =
      std::filesystem::path(GEMMA2_SOURCE_DIR) / "../shared/tokenizers/gemma2-tokenizer.model";
  if (!std::filesystem::exists(vocab))
    GTEST_SKIP() << "skipped: Gemma's tokenizer is not in ../shared/tokenizers";
  const std::string model = (dir_->path() / "gemma-vocab").string();
  int code = 0;
  Shell(Bin("gemma2-make-checkpoint") + " --out " + model +
            " --vocab 256000 --hidden 32 --layers 1 --heads 2 --kv-heads 1 --head-dim 16"
            " --intermediate 64 --seed 4 2>&1",
        &code);
  ASSERT_EQ(code, 0);
  std::filesystem::copy_file(vocab, std::filesystem::path(model) / "tokenizer.model");
  Server s(model, Ranks() + " --api-key-file " + (dir_->path() / "key").string() + " --metrics-open");
  ASSERT_TRUE(s.ok()) << s.ready_line();
  EXPECT_NE(s.ready_line().find("(version " + std::string(GEMMA2_VERSION_FOR_TESTS)), std::string::npos)
      << s.ready_line();
  for (const std::string text : {"Hello, world!", "Ünïcödé — 日本語 🙂 ﷽", "  two spaces\ttab\nnewline",
                                 "for (int i = 0; i < n; ++i) { x[i] *= 2; }"}) {
    const json t = s.Post("/tokenize", {{"prompt", text}});
    ASSERT_TRUE(t["tokens"].is_array()) << t;
    EXPECT_EQ(t["count"], t["tokens"].size());
    EXPECT_EQ(t["tokens"][0], 2) << "<bos> first";
    EXPECT_EQ(t["max_model_len"], 8192);
    const json bare = s.Post("/tokenize", {{"prompt", text}, {"add_special_tokens", false}});
    EXPECT_EQ(bare["count"].get<int>(), t["count"].get<int>() - 1);
    EXPECT_EQ(s.Post("/detokenize", {{"tokens", t["tokens"]}})["prompt"], text);
  }
  const json messages = json::array({{{"role", "developer"}, {"content", "Be brief."}},
                                     {{"role", "user"}, {"content", "Hi there"}}});
  const json counted = s.Post("/tokenize", {{"messages", messages}});
  const json chat = s.Post("/v1/chat/completions", {{"messages", messages}, {"max_tokens", 1}});
  EXPECT_EQ(counted["count"], chat["usage"]["prompt_tokens"]);
  EXPECT_EQ(s.Post("/detokenize", {{"tokens", {2, 256000}}}, 400)["error"]["param"], "tokens");
  // /version (no key), /v1/models/{id}, /metrics open, the rest still keyed.
  const auto version = json::parse(s.Call("GET", "/version", "", {}).body);
  EXPECT_EQ(version["version"], GEMMA2_VERSION_FOR_TESTS);
  EXPECT_EQ(version["commit"].get<std::string>().size() >= 7, true);
  EXPECT_EQ(json::parse(s.Call("GET", "/v1/models/gemma-vocab", "").body)["id"], "gemma-vocab");
  EXPECT_EQ(s.Call("GET", "/v1/models/other", "").status, 404);
  EXPECT_EQ(s.Call("GET", "/metrics", "", {}).status, 200);
  EXPECT_EQ(s.Call("GET", "/v1/models", "", {}).status, 401);
  EXPECT_EQ(s.Call("POST", "/tokenize", R"({"prompt": "x"})", {}).status, 401);
  // The shared server: /classify is /v1/classify (a causal LM refuses it the same way).
  const auto alias = server_->Call("POST", "/classify", R"({"input": "x"})");
  const auto full = server_->Call("POST", "/v1/classify", R"({"input": "x"})");
  EXPECT_EQ(alias.status, full.status);
  EXPECT_EQ(json::parse(alias.body)["error"]["message"], json::parse(full.body)["error"]["message"]);
}

// vLLM's sampling fields, each with an assertion on its effect: logit_bias forces and forbids
// tokens, allowed_token_ids restricts the draw, min_tokens holds EOS back, stop_reason names the
// stop token or string (null for EOS and length), include_stop_str_in_output keeps the string.
TEST_F(ServerTest, LogitBiasMinTokensAllowedIdsAndStopReasons) {
  auto complete = [&](json extra) {
    json body = {{"prompt", "Hello, my name is"}, {"max_tokens", 6}, {"temperature", 0},
                 {"return_token_ids", true}};
    if (extra.is_object()) body.update(extra);
    return server_->Post("/v1/completions", body)["choices"][0];
  };
  const json plain = complete(json::object());
  EXPECT_EQ(plain["stop_reason"], nullptr);
  EXPECT_EQ(plain["finish_reason"], "length");
  const json forced = complete({{"logit_bias", {{"42", 100}}}});
  EXPECT_EQ(forced["token_ids"], json(std::vector<int>(6, 42)));
  const int first = plain["token_ids"][0];
  const json banned = complete({{"logit_bias", {{std::to_string(first), -100}}}});
  EXPECT_NE(banned["token_ids"][0], first);
  const json allowed = complete({{"allowed_token_ids", {5, 6}}, {"temperature", 1}, {"seed", 3}});
  for (const auto& t : allowed["token_ids"]) EXPECT_TRUE(t == 5 || t == 6) << allowed;
  // EOS (id 1) made the likeliest: it ends the choice at once, or after min_tokens.
  const json eos = complete({{"logit_bias", {{"1", 100}}}});
  EXPECT_EQ(eos["finish_reason"], "stop");
  EXPECT_EQ(eos["token_ids"].size(), 1u);
  EXPECT_EQ(eos["stop_reason"], nullptr);
  const json held = complete({{"logit_bias", {{"1", 100}}}, {"min_tokens", 3}});
  EXPECT_EQ(held["finish_reason"], "stop");
  EXPECT_EQ(held["token_ids"].size(), 4u) << held;
  const json by_id = complete({{"logit_bias", {{"42", 100}}}, {"stop_token_ids", {42}}});
  EXPECT_EQ(by_id["stop_reason"], 42);
  EXPECT_EQ(by_id["finish_reason"], "stop");
  // A stop string taken from the greedy text itself: its 2nd and 3rd characters (whole UTF-8).
  const std::string text = plain["text"];
  std::vector<size_t> starts;
  for (size_t i = 0; i < text.size(); ++i) {
    if ((static_cast<unsigned char>(text[i]) & 0xC0) != 0x80) starts.push_back(i);
  }
  ASSERT_GE(starts.size(), 4u) << text;
  const std::string stop = text.substr(starts[1], starts[3] - starts[1]);
  const json by_string = complete({{"stop", {stop}}});
  EXPECT_EQ(by_string["stop_reason"], stop);
  EXPECT_EQ(by_string["text"], text.substr(0, text.find(stop)));
  const json kept = complete({{"stop", {stop}}, {"include_stop_str_in_output", true}});
  EXPECT_EQ(kept["text"], text.substr(0, text.find(stop)) + stop);
  // Bad values are refused by name.
  for (const auto& [field, value] : std::vector<std::pair<std::string, json>>{
           {"logit_bias", {{"x", 1}}}, {"logit_bias", {{"5", 101}}}, {"logit_bias", {{"99999", 1}}},
           {"allowed_token_ids", json::array()}, {"min_tokens", -1}, {"min_tokens", 7}}) {
    json body = {{"prompt", "x"}, {"max_tokens", 6}};
    body[field] = value;
    EXPECT_EQ(server_->Post("/v1/completions", body, 400)["error"]["param"], field) << value;
  }
}

// echo returns the prompt's text in front of the completion (streamed alike); add_special_tokens
// false leaves <bos> out; truncate_prompt_tokens keeps the prompt's last k tokens.
TEST_F(ServerTest, EchoSpecialTokensAndPromptTruncation) {
  const json base = {{"prompt", "Hello, my name is"}, {"max_tokens", 4}, {"temperature", 0},
                     {"return_token_ids", true}};
  const json plain = server_->Post("/v1/completions", base)["choices"][0];
  json echo = base;
  echo["echo"] = true;
  const json echoed = server_->Post("/v1/completions", echo)["choices"][0];
  EXPECT_EQ(echoed["text"], "Hello, my name is" + plain["text"].get<std::string>());
  EXPECT_EQ(echoed["token_ids"], plain["token_ids"]);
  echo["stream"] = true;
  std::string streamed;
  HttpCall call{"POST", "/v1/completions", echo.dump(), {{"Authorization", "Bearer " + kKey}},
                std::chrono::seconds(60)};
  auto r = serving::HttpStream(server_->url(), call, [&](std::string_view data) {
    if (data != "[DONE]") streamed += json::parse(data)["choices"][0]["text"].get<std::string>();
    return true;
  });
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(streamed, echoed["text"]);
  json bare = base;
  bare["add_special_tokens"] = false;
  const json no_bos = server_->Post("/v1/completions", bare)["choices"][0];
  EXPECT_EQ(no_bos["prompt_token_ids"].size() + 1, plain["prompt_token_ids"].size());
  EXPECT_NE(no_bos["prompt_token_ids"][0], 2);
  json cut = base;
  cut["truncate_prompt_tokens"] = 2;
  const json truncated = server_->Post("/v1/completions", cut)["choices"][0];
  const auto& full = plain["prompt_token_ids"];
  EXPECT_EQ(truncated["prompt_token_ids"], json({full[full.size() - 2], full[full.size() - 1]}));
  EXPECT_EQ(server_->Post("/v1/chat/completions",
                          {{"messages", {{{"role", "user"}, {"content", "Hi"}}}},
                           {"add_special_tokens", true}},
                          400)["error"]["param"],
            "add_special_tokens");
}

// prompt_logprobs equal log_softmax of gemma2-run --logits rows (row t scores prompt token t + 1),
// with echo + logprobs giving the same numbers in the legacy shape; both refused when streamed.
TEST_F(ServerTest, PromptLogprobsEqualGemma2RunRows) {
  const std::string prompt = "The quick brown fox jumps over";
  int code = 0;
  const json offline = json::parse(Shell(Bin("gemma2-run") + RunBackend() + " --model " + Lm() +
                                             " --max-new-tokens 1 --logits --prompt '" + prompt + "'",
                                         &code));
  ASSERT_EQ(code, 0);
  const auto ids = offline["prompt_ids"].get<std::vector<int32_t>>();
  ASSERT_GE(ids.size(), 4u);
  const json served = server_->Post("/v1/completions", {{"prompt", prompt}, {"max_tokens", 1},
                                                        {"prompt_logprobs", 2}})["choices"][0];
  const json& plp = served["prompt_logprobs"];
  ASSERT_EQ(plp.size(), ids.size()) << served;
  EXPECT_EQ(plp[0], nullptr);
  std::vector<double> chosen;
  for (size_t t = 0; t + 1 < ids.size(); ++t) {
    const auto row = offline["logits"][t].get<std::vector<double>>();
    const double best = *std::max_element(row.begin(), row.end());
    double z = 0;
    for (double v : row) z += std::exp(v - best);
    const double log_z = best + std::log(z);
    const json& entry = plp[t + 1];
    const std::string next = std::to_string(ids[t + 1]);
    ASSERT_TRUE(entry.contains(next)) << entry;
    EXPECT_NEAR(entry[next]["logprob"].get<double>(), row[static_cast<size_t>(ids[t + 1])] - log_z,
                2e-3) << t;
    EXPECT_GE(entry.size(), 2u);
    EXPECT_LE(entry.size(), 3u);  // the top 2 and the prompt's own token
    chosen.push_back(entry[next]["logprob"].get<double>());
  }
  // The test model must not find every prompt token equally likely.
  EXPECT_GT(*std::max_element(chosen.begin(), chosen.end()) -
                *std::min_element(chosen.begin(), chosen.end()), 0.1);
  const json echoed = server_->Post("/v1/completions", {{"prompt", prompt}, {"max_tokens", 2},
                                                        {"echo", true}, {"logprobs", 1}})["choices"][0];
  const json& lp = echoed["logprobs"];
  ASSERT_EQ(lp["token_logprobs"].size(), ids.size() + 2) << echoed;
  EXPECT_EQ(lp["token_logprobs"][0], nullptr);
  for (size_t t = 1; t < ids.size(); ++t)
    EXPECT_NEAR(lp["token_logprobs"][t].get<double>(), chosen[t - 1], 1e-6) << t;
  EXPECT_EQ(lp["tokens"][0], "<bos>");
  EXPECT_EQ(echoed["text"].get<std::string>().rfind(prompt, 0), 0u);
  EXPECT_EQ(server_->Post("/v1/completions", {{"prompt", prompt}, {"prompt_logprobs", 1},
                                              {"stream", true}}, 400)["error"]["param"],
            "prompt_logprobs");
  EXPECT_EQ(server_->Post("/v1/completions", {{"prompt", prompt}, {"echo", true}, {"logprobs", 1},
                                              {"stream", true}}, 400)["error"]["param"],
            "echo");
  const json chat = server_->Post("/v1/chat/completions",
                                  {{"messages", {{{"role", "user"}, {"content", prompt}}}},
                                   {"max_tokens", 1}, {"prompt_logprobs", 0}});
  EXPECT_EQ(chat["prompt_logprobs"][0], nullptr);
  EXPECT_GT(chat["prompt_logprobs"].size(), ids.size()) << chat;  // the template's tokens too
}

// bad_words never completes a banned word; skip_special_tokens false shows special tokens in the
// text; add_generation_prompt and continue_final_message shape the chat prompt.
TEST_F(ServerTest, BadWordsSpecialTokensAndChatTemplateEndings) {
  const json base = {{"prompt", "Hello, my name is"}, {"max_tokens", 6}, {"temperature", 0},
                     {"return_token_ids", true}};
  const json plain = server_->Post("/v1/completions", base)["choices"][0];
  // The first generated token that is a word of its own (one piece, not blank) is banned.
  int first = -1;
  std::string word;
  for (const auto& t : plain["token_ids"]) {
    word = server_->Post("/detokenize", {{"tokens", {t}}})["prompt"];
    const auto back =
        server_->Post("/tokenize", {{"prompt", word}, {"add_special_tokens", false}})["tokens"];
    if (back.size() == 1 && back[0] == t && word.find_first_not_of(" \n") != std::string::npos) {
      first = t;
      break;
    }
  }
  ASSERT_GE(first, 0) << plain;
  json banned = base;
  banned["bad_words"] = {word};
  const json avoided = server_->Post("/v1/completions", banned)["choices"][0];
  for (const auto& t : avoided["token_ids"]) EXPECT_NE(t, first) << avoided;
  EXPECT_NE(avoided["token_ids"], plain["token_ids"]);
  json shown = base;
  shown["logit_bias"] = {{"2", 100}};  // <bos> every time
  shown["max_tokens"] = 2;
  EXPECT_EQ(server_->Post("/v1/completions", shown)["choices"][0]["text"], "");
  shown["skip_special_tokens"] = false;
  EXPECT_EQ(server_->Post("/v1/completions", shown)["choices"][0]["text"], "<bos><bos>");
  shown["echo"] = true;
  EXPECT_EQ(server_->Post("/v1/completions", shown)["choices"][0]["text"],
            "<bos>Hello, my name is<bos><bos>");

  const json turns = {{{"role", "user"}, {"content", "Hi"}},
                      {{"role", "assistant"}, {"content", "Hello, I"}}};
  const json user_only = {{{"role", "user"}, {"content", "Hi"}}};
  auto tokens = [&](json body) { return server_->Post("/tokenize", body)["tokens"]; };
  const json with_prompt = tokens({{"messages", user_only}});
  const json without = tokens({{"messages", user_only}, {"add_generation_prompt", false}});
  ASSERT_GT(with_prompt.size(), without.size());
  EXPECT_EQ(json(std::vector<json>(with_prompt.begin(), with_prompt.begin() + without.size())),
            without);
  const json open = tokens({{"messages", turns}, {"add_generation_prompt", false},
                            {"continue_final_message", true}});
  const json closed = tokens({{"messages", turns}, {"add_generation_prompt", false}});
  ASSERT_LT(open.size(), closed.size());
  EXPECT_EQ(json(std::vector<json>(closed.begin(), closed.begin() + open.size())), open);
  const json continued = server_->Post(
      "/v1/chat/completions", {{"messages", turns}, {"add_generation_prompt", false},
                               {"continue_final_message", true}, {"max_tokens", 3},
                               {"temperature", 0}, {"return_token_ids", true}});
  EXPECT_EQ(continued["choices"][0]["prompt_token_ids"], open);
  EXPECT_EQ(server_->Post("/v1/chat/completions",
                          {{"messages", turns}, {"continue_final_message", true}}, 400)
                ["error"]["param"],
            "continue_final_message");
}

// --quantization fp8 reaches every worker: /v1/models reports it, and the served greedy tokens
// equal gemma2-run's with the same quantization and tp (each rank scales its own slice) while
// differing from the unquantized model's.
TEST_F(ServerTest, Fp8QuantizationReachesTheWorkers) {
  Server fp8(Lm(), Ranks() + " --quantization fp8 --api-key-file " + (dir_->path() / "key").string());
  ASSERT_TRUE(fp8.ok()) << fp8.ready_line();
  const json models = json::parse(fp8.Call("GET", "/v1/models", "").body);
  EXPECT_EQ(models["data"][0]["quantization"], "fp8");
  EXPECT_EQ(json::parse(server_->Call("GET", "/v1/models", "").body)["data"][0]["quantization"],
            "none");
  const std::string prompt = "The quick brown fox";
  const std::string tp = Cuda() ? "" : " --tp 2";
  int code = 0;
  const json offline = json::parse(Shell(Bin("gemma2-run") + RunBackend() + tp + " --model " + Lm() +
                                             " --quantization fp8 --max-new-tokens 12 --prompt '" +
                                             prompt + "'",
                                         &code));
  ASSERT_EQ(code, 0);
  const json body = {{"prompt", prompt}, {"max_tokens", 12}, {"temperature", 0},
                     {"return_token_ids", true}};
  const json served = fp8.Post("/v1/completions", body)["choices"][0];
  EXPECT_EQ(served["token_ids"], offline["generated_ids"]);
  const json plain_logits = server_->Post("/v1/completions", {{"prompt", prompt}, {"max_tokens", 1},
                                                             {"logprobs", 5}})["choices"][0];
  const json fp8_logits = fp8.Post("/v1/completions", {{"prompt", prompt}, {"max_tokens", 1},
                                                       {"logprobs", 5}})["choices"][0];
  EXPECT_NE(plain_logits["logprobs"]["token_logprobs"], fp8_logits["logprobs"]["token_logprobs"])
      << "the fp8 server computed with unquantized weights";
}

// --kv-cache-dtype fp8 reaches the workers (their caches round keys and values through E4M3):
// /v1/models says so, the served greedy tokens equal gemma2-run's with the same flag, and the
// logprobs differ from the default cache's.
TEST_F(ServerTest, Fp8KvCacheReachesTheWorkers) {
  Server fp8(Lm(),
             Ranks() + " --kv-cache-dtype fp8 --api-key-file " + (dir_->path() / "key").string());
  ASSERT_TRUE(fp8.ok()) << fp8.ready_line();
  EXPECT_EQ(json::parse(fp8.Call("GET", "/v1/models", "").body)["data"][0]["kv_cache_dtype"],
            "fp8");
  EXPECT_EQ(json::parse(server_->Call("GET", "/v1/models", "").body)["data"][0]["kv_cache_dtype"],
            "auto");
  const std::string prompt = "The quick brown fox jumps";
  int code = 0;
  const std::string tp = Cuda() ? "" : " --tp 2";
  const json offline =
      json::parse(Shell(Bin("gemma2-run") + RunBackend() + tp + " --model " + Lm() +
                            " --kv-cache-dtype fp8 --max-new-tokens 12 --prompt '" + prompt + "'",
                        &code));
  ASSERT_EQ(code, 0);
  const json body = {
      {"prompt", prompt}, {"max_tokens", 12}, {"temperature", 0}, {"return_token_ids", true}};
  EXPECT_EQ(fp8.Post("/v1/completions", body)["choices"][0]["token_ids"], offline["generated_ids"]);
  const json one = {{"prompt", prompt}, {"max_tokens", 1}, {"logprobs", 5}};
  EXPECT_NE(server_->Post("/v1/completions", one)["choices"][0]["logprobs"]["token_logprobs"],
            fp8.Post("/v1/completions", one)["choices"][0]["logprobs"]["token_logprobs"])
      << "the fp8 cache was not rounded";
}

// Launch options that cannot work are refused before any rank starts, at once, by name: a KV
// cache dtype not built, a --tokenizer that is not a sentencepiece model.
TEST_F(ServerTest, BadLaunchOptionsAreRefusedBeforeAnyRankStarts) {
  int code = 0;
  const std::string refused =
      Shell(Bin("gemma2-launch") + " --model " + Lm() + " --kv-cache-dtype fp8_e5m2 2>&1", &code);
  EXPECT_NE(code, 0);
  EXPECT_NE(refused.find("--kv-cache-dtype"), std::string::npos) << refused;
  const std::string bad = (dir_->path() / "not_a_tokenizer.model").string();
  std::ofstream(bad) << "not a sentencepiece model";
  const auto t0 = std::chrono::steady_clock::now();
  // The model does not exist either: a launcher that started ranks would fail on it first.
  const std::string no_tok =
      Shell(Bin("gemma2-launch") + " --model " + (dir_->path() / "no_such_model").string() + " " +
                Ranks() + " --tokenizer " + bad + " 2>&1",
            &code);
  EXPECT_NE(code, 0);
  EXPECT_NE(no_tok.find(bad), std::string::npos) << no_tok;
  EXPECT_EQ(no_tok.find("no_such_model"), std::string::npos) << "the model came first: " << no_tok;
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 5.0);
}

// The metrics operators alert on (vLLM's set, docs/metrics.md): per-request latency phases and
// token counts, finished reasons, KV usage as a ratio, prefix-cache queries beside hits, and a
// model_name label on every series (checked by Metrics()).
TEST_F(ServerTest, RequestPhasesFinishReasonsAndKvUsageAreMeasured) {
  const auto m0 = server_->Metrics();
  for (int i = 0; i < 3; ++i) {
    server_->Post("/v1/completions", {{"prompt", "metrics " + std::to_string(i)},
                                      {"max_tokens", 3}, {"n", 2}, {"ignore_eos", true}});
  }
  const auto m1 = server_->Metrics();
  auto delta = [&](const std::string& k) { return m1.at(k) - (m0.count(k) ? m0.at(k) : 0.0); };
  EXPECT_EQ(delta("gemma2_request_success_total{finished_reason=\"length\"}"), 6);
  for (const char* h : {"gemma2_e2e_request_latency_seconds", "gemma2_request_queue_time_seconds",
                        "gemma2_request_prefill_time_seconds", "gemma2_request_decode_time_seconds",
                        "gemma2_request_prompt_tokens", "gemma2_request_generation_tokens"}) {
    EXPECT_EQ(delta(std::string(h) + "_count"), 3) << h;
  }
  EXPECT_EQ(delta("gemma2_request_generation_tokens_sum"), 18);
  EXPECT_GE(m1.at("gemma2_kv_cache_usage"), 0.0);
  EXPECT_LE(m1.at("gemma2_kv_cache_usage"), 1.0);
  EXPECT_GE(m1.at("gemma2_prefix_cache_queries_total"), m1.at("gemma2_prefix_cache_hit_tokens_total"));
  EXPECT_GT(delta("gemma2_prefix_cache_queries_total"), 0);
  // Every series docs/grafana-dashboard.json queries is served.
  const std::string body = server_->Call("GET", "/metrics", "").body;
  std::ifstream dash(std::string(GEMMA2_SOURCE_DIR) + "/docs/grafana-dashboard.json");
  const std::string dashboard((std::istreambuf_iterator<char>(dash)), {});
  const std::regex series("gemma2_[a-z_]+");
  int queried = 0;
  for (auto it = std::sregex_iterator(dashboard.begin(), dashboard.end(), series);
       it != std::sregex_iterator(); ++it, ++queried) {
    EXPECT_NE(body.find("\n" + it->str()), std::string::npos) << it->str();
  }
  EXPECT_GT(queried, 10);
  // Every sample line is valid Prometheus text: name{labels} value.
  std::istringstream text(body);
  const std::regex sample(R"(^[a-zA-Z_:][a-zA-Z0-9_:]*\{([a-zA-Z_][a-zA-Z0-9_]*="[^"]*",?)+\} [-+0-9.eE]+$)");
  for (std::string line; std::getline(text, line);) {
    if (line.empty() || line[0] == '#') continue;
    EXPECT_TRUE(std::regex_match(line, sample)) << line;
  }
}

// The log of a short run (--log-format json: one object a line on stderr): the ready line, one
// access line per request with its facts, a refused request with its status, the drain.
TEST_F(ServerTest, JsonLogHasReadyAccessLinesAndTheDrain) {
  Server s(Lm(), Ranks() + " --log-format json");
  ASSERT_TRUE(s.ok()) << s.ready_line();
  s.Post("/v1/completions", {{"prompt", "log me"}, {"max_tokens", 3}, {"ignore_eos", true}});
  s.Post("/v1/completions", {{"prompt", "x"}, {"top_p", 7}}, 400);
  kill(s.pid(), SIGTERM);
  EXPECT_EQ(s.Wait(), 0);
  std::istringstream lines(s.Rest());
  std::vector<json> records;
  for (std::string line; std::getline(lines, line);) {
    if (line.empty() || line[0] != '{') continue;  // stdout's plain lines ride the same pipe
    const json j = json::parse(line, nullptr, false);
    ASSERT_FALSE(j.is_discarded()) << line;
    for (const char* k : {"time", "level", "program", "msg"}) EXPECT_TRUE(j.contains(k)) << line;
    records.push_back(j);
  }
  auto find = [&](auto pred) {
    for (const auto& r : records) if (pred(r)) return r;
    return json();
  };
  const json ready = find([](const json& r) { return r["msg"] == "ready"; });
  EXPECT_EQ(ready["level"], "info");
  EXPECT_NE(ready["version"].get<std::string>().find(GEMMA2_VERSION_FOR_TESTS), std::string::npos);
  const json ok = find([](const json& r) { return r["msg"] == "request" && r["status"] == "200"; });
  EXPECT_EQ(ok["route"], "/v1/completions");
  EXPECT_EQ(ok["completion_tokens"], "3");
  EXPECT_EQ(ok["finish_reason"], "length");
  for (const char* k : {"request_id", "client", "prompt_tokens", "ttft_ms", "duration_ms"})
    EXPECT_TRUE(ok.contains(k)) << ok;
  const json bad = find([](const json& r) { return r["msg"] == "request" && r["status"] == "400"; });
  EXPECT_NE(bad["error"].get<std::string>().find("top_p"), std::string::npos) << bad;
  EXPECT_FALSE(find([](const json& r) { return r["msg"] == "draining on signal"; }).is_null());
}

// The clients users move from vLLM with (tests/js, installed by make test from its lock file):
// completions, chat, streaming and batches through each, equal to the server's own answer to the
// request the client sent; unsupported structured output refused out loud.
void RunNodeClient(const Server& server, const std::string& script, const std::string& package) {
  const std::string js = std::string(GEMMA2_SOURCE_DIR) + "/tests/js";
  if (Shell("command -v node").empty() || !std::filesystem::exists(js + "/node_modules/" + package)) {
    GTEST_SKIP() << "skipped: node or tests/js/node_modules/" << package
                 << " missing (make test runs npm ci there)";
  }
  int code = 0;
  const std::string out = Shell(
      "node " + js + "/" + script + " " + server.base() + " " + kKey + " lm 2>&1", &code);
  EXPECT_EQ(code, 0) << out;
  EXPECT_NE(out.find("\"ok\":true"), std::string::npos) << out;
}

TEST_F(ServerTest, OfficialOpenAiNodePackage) {
  RunNodeClient(*server_, "openai_client.mjs", "openai");
}

TEST_F(ServerTest, VercelAiSdk) { RunNodeClient(*server_, "ai_sdk_client.mjs", "@ai-sdk/openai-compatible"); }

TEST_F(ServerTest, LangChainJs) { RunNodeClient(*server_, "langchain_client.mjs", "@langchain/openai"); }

// 200 random JSON Schema documents of the supported subset, greedy and sampled, through chat and
// completions: every answer that ends parses and validates under ajv; regexes and choices match
// (tests/js/structured_check.mjs).
TEST_F(ServerTest, RandomSchemasValidateUnderAjv) {
  RunNodeClient(*server_, "structured_check.mjs", "ajv");
}

// What the constraint engine cannot honour is a 400 naming it; an answer cut by max_tokens inside
// the structure ends with "length"; a reply forced to calls ends with "tool_calls".
TEST_F(ServerTest, StructuredOutputErrorsAndEnds) {
  const std::string url = server_->base();
  auto post = [&](const std::string& path, const json& body) {
    return json::parse(Curl(url + path + " -d '" + body.dump() + "'"));
  };
  const json messages = json::array({{{"role", "user"}, {"content", "Hi"}}});
  json e = post("/v1/chat/completions",
                {{"messages", messages},
                 {"response_format",
                  {{"type", "json_schema"},
                   {"json_schema", {{"name", "x"}, {"schema", {{"type", "string"}, {"pattern", "a+"}}}}}}}});
  EXPECT_EQ(e["error"]["param"], "response_format") << e;
  EXPECT_NE(e["error"]["message"].get<std::string>().find("keyword 'pattern'"), std::string::npos) << e;
  e = post("/v1/completions", {{"prompt", "x"}, {"guided_regex", "a+"}, {"guided_choice", {"a"}}});
  EXPECT_NE(e["error"]["message"].get<std::string>().find("both ask for structure"), std::string::npos) << e;
  e = post("/v1/completions", {{"prompt", "x"}, {"guided_regex", "(a"}});
  EXPECT_EQ(e["error"]["param"], "guided_regex") << e;
  e = post("/v1/chat/completions", {{"messages", messages},
                                    {"tools", json::array()},
                                    {"tool_choice", {{"type", "function"}, {"function", {{"name", "f"}}}}}});
  EXPECT_EQ(e["error"]["param"], "tool_choice") << e;

  json cut = post("/v1/completions", {{"prompt", "x"}, {"max_tokens", 3}, {"guided_regex", "[a-z]{40}"}});
  EXPECT_EQ(cut["choices"][0]["finish_reason"], "length") << cut;
  json whole = post("/v1/completions", {{"prompt", "x"}, {"max_tokens", 60}, {"guided_regex", "[a-z]{5}"}});
  EXPECT_EQ(whole["choices"][0]["finish_reason"], "stop") << whole;
  EXPECT_EQ(whole["choices"][0]["text"].get<std::string>().size(), 5u) << whole;

  const json tools = json::array({{{"type", "function"},
                                   {"function",
                                    {{"name", "f"},
                                     {"parameters",
                                      {{"type", "object"},
                                       {"properties", {{"n", {{"type", "integer"}, {"minimum", 1}, {"maximum", 9}}}}},
                                       {"required", {"n"}}}}}}}});
  json called = post("/v1/chat/completions", {{"messages", messages}, {"tools", tools},
                                              {"tool_choice", "required"}, {"max_tokens", 40},
                                              {"parallel_tool_calls", false}});
  ASSERT_EQ(called["choices"][0]["finish_reason"], "tool_calls") << called;
  const json& msg = called["choices"][0]["message"];
  EXPECT_TRUE(msg["content"].is_null()) << called;
  ASSERT_EQ(msg["tool_calls"].size(), 1u) << called;
  const json args = json::parse(msg["tool_calls"][0]["function"]["arguments"].get<std::string>());
  EXPECT_GE(args["n"].get<int>(), 1);
  EXPECT_LE(args["n"].get<int>(), 9);
}

TEST_F(ServerTest, Gemma2ClientWritesOneResultPerLineInOrder) {
  const auto in = dir_->path() / "prompts.jsonl";
  std::ofstream(in) << "Hello there\n"
                    << R"({"prompt": "Write a haiku", "max_tokens": 3})"
                    << "\n"
                    << R"({"messages": [{"role": "user", "content": "Hi"}]})"
                    << "\n"
                    << R"({"prompt": "x", "temperature": -1})"
                    << "\n";
  for (const char* mode : {"", " --stream"}) {
    int code = 0;
    const auto out = dir_->path() / "results.jsonl";
    const std::string log =
        Shell(Bin("gemma2-client") + " --url " + server_->base() + " --api-key " + kKey +
                  " --input " + in.string() + " --output " + out.string() +
                  " --concurrency 3 --max-tokens 5" + mode + " 2>&1",
              &code);
    EXPECT_EQ(code, 1) << log;  // one line is a bad request
    EXPECT_NE(log.find("4 requests, 1 failed"), std::string::npos) << log;
    std::ifstream res(out);
    std::string line;
    int i = 0;
    while (std::getline(res, line)) {
      json j = json::parse(line);
      EXPECT_EQ(j["index"], i) << line;
      EXPECT_EQ(j["status"], i == 3 ? 400 : 200) << line;
      if (i == 2) {
        EXPECT_EQ(j["response"]["choices"][0]["message"]["role"], "assistant") << line;
      }
      if (i < 3) {  // --max-tokens 5 applies to every line; a sampled EOS may end one sooner
        const json& tokens = j["response"]["usage"]["completion_tokens"];
        if (j["response"]["choices"][0]["finish_reason"] == "length")
          EXPECT_EQ(tokens, 5) << line;
        else
          EXPECT_LE(tokens.get<int>(), 5) << line;
      }
      ++i;
    }
    EXPECT_EQ(i, 4);
  }
}

// A full queue answers 429 with Retry-After at once; gemma2-client's retries get every answer.
// gemma2-serve-bench against the server: every request completes with the fixed output length
// (ignore_eos), the figures are ordered (p50 <= p90 <= p99, TTFT < E2E), a Poisson rate spreads
// the arrivals over time, and the sweep's plot names each rate.
TEST_F(ServerTest, ServeBenchMeasuresARateSweep) {
  const auto out = dir_->path() / "serve_bench.json", svg = dir_->path() / "sweep.svg";
  int code = 0;
  const std::string log = Shell(Bin("gemma2-serve-bench") + " --url " + server_->base() +
                                    " --api-key " + kKey +
                                    " --num-prompts 12 --warmup 2 --input-len 16,40 --output-len 6"
                                    " --concurrency 4 --vocab-size 200 --sweep 10,inf --chunk-stats --out " +
                                    out.string() + " --svg " + svg.string() + " 2>&1",
                                &code);
  ASSERT_EQ(code, 0) << log;
  const json doc = json::parse(std::ifstream(out));
  ASSERT_EQ(doc["runs"].size(), 2u) << doc;
  for (const json& r : doc["runs"]) {
    EXPECT_EQ(r["completed"], 12) << r;
    EXPECT_EQ(r["failed"], 0) << r;
    EXPECT_EQ(r["output_tokens"], 12 * 6) << r;
    EXPECT_GE(r["input_tokens"].get<int>(), 12 * 16);
    EXPECT_LE(r["input_tokens"].get<int>(), 12 * 40);
    EXPECT_GT(r["output_throughput"].get<double>(), 0);
    for (const char* k : {"ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"}) {
      EXPECT_LE(r[k]["p50"].get<double>(), r[k]["p90"].get<double>()) << k;
      EXPECT_LE(r[k]["p90"].get<double>(), r[k]["p99"].get<double>()) << k;
      EXPECT_GT(r[k]["p50"].get<double>(), 0) << k;
    }
    EXPECT_LT(r["ttft_ms"]["mean"].get<double>(), r["e2e_ms"]["mean"].get<double>());
    // --chunk-stats: usage in every chunk; each answer's 6 tokens came in 1 to 6 chunks.
    EXPECT_GE(r["token_chunks"].get<int>(), 12) << r;
    EXPECT_LE(r["token_chunks"].get<int>(), 12 * 6) << r;
    EXPECT_LE(r["multi_token_chunks"].get<int>(), r["token_chunks"].get<int>()) << r;
  }
  // 12 Poisson arrivals at 10/s span ~1.1 s on average (the seed fixes them); the run lasts at
  // least that long. "inf" sends them all at once.
  const json& poisson = doc["runs"][0];
  EXPECT_GT(poisson["arrival_span_s"].get<double>(), 0.3) << poisson;
  EXPECT_GE(poisson["duration_s"].get<double>(), poisson["arrival_span_s"].get<double>());
  EXPECT_EQ(doc["runs"][1]["arrival_span_s"].get<double>(), 0.0);
  std::stringstream plot;
  plot << std::ifstream(svg).rdbuf();
  EXPECT_NE(plot.str().find("<svg"), std::string::npos);
  EXPECT_NE(plot.str().find("10/s"), std::string::npos);
  EXPECT_NE(plot.str().find("inf/s"), std::string::npos);
}

// --trace writes every step's phases as a Chrome trace that parses whole, even while the server
// still runs: schedule, submit and apply on the scheduler's lane, the step itself on its own,
// each step numbered and sized (the tokens of a request's prefill and decode all appear).
TEST_F(ServerTest, TraceRecordsEveryStepsPhases) {
  const auto path = dir_->path() / "trace.json";
  Server traced(Lm(), Ranks() + " --trace " + path.string() + " --api-key-file " +
                          (dir_->path() / "key").string());
  ASSERT_TRUE(traced.ok()) << traced.ready_line();
  traced.Post("/v1/completions", {{"prompt", {5, 6, 7, 8, 9, 10, 11}}, {"max_tokens", 5},
                                  {"ignore_eos", true}});
  // A second prompt of the same length: its prefill repeats the first one's shape.
  traced.Post("/v1/completions",
              {{"prompt", {12, 13, 14, 15, 16, 17, 18}}, {"max_tokens", 5}, {"ignore_eos", true}});
  std::stringstream text;
  text << std::ifstream(path).rdbuf();
  const json events = json::parse(text.str() + "{}]");  // still open: close it as a viewer does
  std::map<std::string, int> names;
  std::map<int64_t, double> step_us, ranks_us, submit_us;  // by step number
  int64_t step_tokens = 0, last_step = 0;
  for (const json& e : events) {
    if (!e.contains("name")) continue;
    ++names[e["name"].get<std::string>()];
    EXPECT_EQ(e["ph"], "X");
    EXPECT_GE(e["dur"].get<double>(), 0);
    if (e["name"] == "ranks") ranks_us[e["args"]["step"].get<int64_t>()] = e["dur"].get<double>();
    if (e["name"] == "step") step_us[e["args"]["step"].get<int64_t>()] = e["dur"].get<double>();
    if (e["name"] == "submit") submit_us[e["args"]["step"].get<int64_t>()] = e["dur"].get<double>();
    if (e["name"] == "step") {
      step_tokens += e["args"]["tokens"].get<int64_t>();
      EXPECT_GT(e["args"]["step"].get<int64_t>(), last_step);
      last_step = e["args"]["step"].get<int64_t>();
      EXPECT_GE(e["tid"].get<int>(), 1);
    }
  }
  for (const char* n : {"schedule", "submit", "step", "ranks", "apply"}) EXPECT_GE(names[n], 5) << n;
  EXPECT_GE(step_tokens, 2 * (7 + 4));  // each prompt, then 4 decode steps (and the probe)
  // The ranks' own time is inside the submit and the step (a rank may start before the plan has
  // reached the last rank; the rest is plan encoding and the control plane).
  for (const auto& [step, us] : ranks_us) {
    ASSERT_TRUE(step_us.count(step) && submit_us.count(step)) << step;
    EXPECT_GT(us, 0) << step;
    EXPECT_LE(us, submit_us[step] + step_us[step] + 1) << step;
  }
  // tools/trace_summary.py reads the still-open trace: every step counted once, in one of its
  // three groups (the first of a shape, decode and mixed repeats), none of them empty here.
  int has_python = 1;
  Shell("command -v python3 >/dev/null", &has_python);
  if (has_python != 0) {
    std::printf("[ skipped ] tools/trace_summary.py: no python3 here\n");
    return;
  }
  int code = -1;
  const std::string summary = Shell("python3 " + std::string(GEMMA2_SOURCE_DIR) +
                                        "/tools/trace_summary.py " + path.string() + " 2>&1",
                                    &code);
  ASSERT_EQ(code, 0) << summary;
  EXPECT_EQ(summary.rfind(std::to_string(step_us.size()) + " steps over ", 0), 0u) << summary;
  int64_t grouped = 0;
  for (const char* group : {"first of its shape", "decode repeat", "mixed repeat"}) {
    const size_t at = summary.find(group);
    ASSERT_NE(at, std::string::npos) << group << "\n" << summary;
    const int64_t count = std::stoll(summary.substr(at + std::string(group).size()));
    EXPECT_GT(count, 0) << group << "\n" << summary;
    grouped += count;
  }
  EXPECT_EQ(grouped, static_cast<int64_t>(step_us.size())) << summary;
  EXPECT_NE(summary.find("host submit: "), std::string::npos) << summary;
}

TEST_F(ServerTest, FullQueueIs429AndTheClientRetries) {
  Server small(Lm(), Ranks() + " --max-running 1 --max-queue 1");
  ASSERT_TRUE(small.ok()) << small.ready_line();
  std::atomic<int> busy{0}, retry_after{0};
  std::vector<std::thread> ts;
  for (int i = 0; i < 6; ++i) {
    ts.emplace_back([&] {
      auto r = small.Call("POST", "/v1/completions", R"({"prompt": "x", "max_tokens": 40})", {});
      if (r.status == 429) {
        ++busy;
        retry_after += r.headers.count("retry-after");
      }
    });
  }
  for (auto& t : ts) t.join();
  EXPECT_GT(busy.load(), 0);
  EXPECT_EQ(retry_after.load(), busy.load());
  const auto in = dir_->path() / "many.jsonl";
  {
    std::ofstream f(in);
    for (int i = 0; i < 12; ++i) f << "prompt " << i << "\n";
  }
  int code = 0;
  const std::string log =
      Shell(Bin("gemma2-client") + " --url " + small.base() + " --input " + in.string() +
                " --output /dev/null --concurrency 8 --max-tokens 8 2>&1",
            &code);
  EXPECT_EQ(code, 0) << log;
  EXPECT_NE(log.find("12 requests, 0 failed"), std::string::npos) << log;
  EXPECT_EQ(log.find(" 0 retries"), std::string::npos) << log;  // some were retried
}

// Many concurrent streaming clients with a mix of good, bad and abandoned requests: every request
// ends in exactly one outcome, and /metrics agrees with the clients' ledger.
TEST_F(ServerTest, LedgerOfConcurrentStreamsReconcilesWithMetrics) {
  const char* env = std::getenv("GEMMA2_LEDGER_SECONDS");
  const double seconds = env ? std::atof(env) : 60;
  const int clients = 64;
  Server s(Lm(), Ranks() + " --max-running 64");
  ASSERT_TRUE(s.ok()) << s.ready_line();
  std::mutex mu;
  std::map<std::string, int> ledger;  // success, rejected, abandoned, failed, lost
  std::set<std::string> ids;
  int duplicates = 0;
  const auto end = Clock::now() + std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000));
  std::vector<std::thread> ts;
  for (int c = 0; c < clients; ++c) {
    ts.emplace_back([&, c] {
      std::mt19937 rng(c);
      for (int n = 0; Clock::now() < end; ++n) {
        const int kind = static_cast<int>(rng() % 10);  // 0: bad input, 1: walk away, else good
        json body = {{"prompt", "client " + std::to_string(c) + " request " + std::to_string(n)},
                     {"max_tokens", 1 + rng() % 24},
                     {"stream", true}};
        if (kind == 0) body["top_p"] = 7;
        const std::string rid = "c" + std::to_string(c) + "-" + std::to_string(n);
        HttpCall call{"POST",
                      "/v1/completions",
                      body.dump(),
                      {{"X-Request-Id", rid}},
                      std::chrono::seconds(60)};
        int events = 0;
        bool done = false, error_event = false;
        auto r = serving::HttpStream(s.url(), call, [&](std::string_view data) {
          if (data == "[DONE]")
            done = true;
          else if (data.find("\"error\"") != std::string_view::npos)
            error_event = true;
          return !(kind == 1 && ++events >= 2);  // walk away after two events
        });
        std::string outcome;
        if (!r.ok())
          outcome = "lost";
        else if (r->status == 400)
          outcome = "rejected";
        else if (r->status != 200 || error_event)
          outcome = "failed";
        else if (kind == 1 && !done)
          outcome = "abandoned";
        else if (done)
          outcome = "success";
        else
          outcome = "lost";
        std::lock_guard<std::mutex> lock(mu);
        ++ledger[outcome];
        if (r.ok() && r->headers["x-request-id"] != rid) ++ledger["wrong id"];
        if (!ids.insert(rid).second) ++duplicates;
      }
    });
  }
  for (auto& t : ts) t.join();
  // Abandoned streams are cancelled at the server's next poll; wait for the batch to empty.
  std::map<std::string, double> m;
  for (int i = 0; i < 100; ++i) {
    m = s.Metrics();
    if (m["gemma2_running_sequences"] == 0 && m["gemma2_queue_depth"] == 0) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  int total = 0;
  for (const auto& [k, v] : ledger) total += v;
  std::string summary;
  for (const auto& [k, v] : ledger) summary += k + "=" + std::to_string(v) + " ";
  std::printf("ledger over %.0f s, %d clients: %d requests: %s\n", seconds, clients, total,
              summary.c_str());
  EXPECT_EQ(ledger["lost"], 0) << summary;
  EXPECT_EQ(ledger["failed"], 0) << summary;
  EXPECT_EQ(ledger["wrong id"], 0) << summary;
  EXPECT_EQ(duplicates, 0);
  EXPECT_GT(ledger["success"], clients);
  EXPECT_GT(ledger["abandoned"], 0);
  const double received = m["gemma2_requests_received_total"];
  const double success = m["gemma2_requests_total{outcome=\"success\"}"];
  const double rejected = m["gemma2_requests_total{outcome=\"rejected\"}"];
  const double failed = m["gemma2_requests_total{outcome=\"failed\"}"];
  const double cancelled = m["gemma2_requests_total{outcome=\"cancelled\"}"];
  EXPECT_EQ(received, total);
  EXPECT_EQ(received, success + rejected + failed + cancelled);
  EXPECT_EQ(rejected, ledger["rejected"]);
  EXPECT_EQ(failed, 0);
  // A walk-away that raced its last token may have finished first: success or cancelled, once.
  EXPECT_EQ(success + cancelled, ledger["success"] + ledger["abandoned"]);
  EXPECT_LE(success, ledger["success"] + ledger["abandoned"]);
  EXPECT_GE(success, ledger["success"]);
  EXPECT_EQ(m["gemma2_kv_blocks_used"], 0);
}

// Half of many long streams are closed mid-generation: the running batch and the KV blocks return
// to their idle values.
TEST_F(ServerTest, DisconnectStormReturnsToIdle) {
  Server s(Lm(), Ranks());
  ASSERT_TRUE(s.ok()) << s.ready_line();
  const auto idle = s.Metrics();
  std::vector<std::thread> ts;
  std::atomic<int> completed{0};
  for (int c = 0; c < 32; ++c) {
    ts.emplace_back([&, c] {
      HttpCall call{"POST",
                    "/v1/completions",
                    json{{"prompt", "storm " + std::to_string(c)},
                         {"max_tokens", 120},
                         {"stream", true},
                         {"ignore_eos", true}}
                        .dump(),
                    {}};
      int events = 0;
      bool done = false;
      auto r = serving::HttpStream(s.url(), call, [&](std::string_view data) {
        done |= data == "[DONE]";
        return !(c % 2 == 0 && ++events >= 3);
      });
      if (r.ok() && done) ++completed;
    });
  }
  for (auto& t : ts) t.join();
  EXPECT_EQ(completed.load(), 16);
  std::map<std::string, double> m;
  for (int i = 0; i < 100; ++i) {
    m = s.Metrics();
    if (m["gemma2_running_sequences"] == 0 && m["gemma2_kv_blocks_used"] == 0) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_EQ(m["gemma2_running_sequences"], idle.at("gemma2_running_sequences"));
  EXPECT_EQ(m["gemma2_kv_blocks_used"], idle.at("gemma2_kv_blocks_used"));
  // Finished streams may leave their prompts as cached prefixes: evictable, so free again on
  // demand.
  EXPECT_EQ(m["gemma2_kv_blocks_free"] + m["gemma2_kv_blocks_cached"],
            idle.at("gemma2_kv_blocks_free"));
  EXPECT_EQ(m["gemma2_requests_total{outcome=\"cancelled\"}"], 16);
  EXPECT_EQ(m["gemma2_requests_total{outcome=\"success\"}"], 16);
}

// SIGTERM: requests in flight finish, new connections are refused, every process exits, code 0.
TEST_F(ServerTest, SigtermDrainsInFlightRequests) {
  Server s(Lm(), Ranks());
  ASSERT_TRUE(s.ok()) << s.ready_line();
  serving::HttpResponse answer;
  std::thread t([&] {
    answer = s.Call("POST", "/v1/completions",
                    R"({"prompt": "long", "max_tokens": 150, "ignore_eos": true})", {});
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  kill(s.pid(), SIGTERM);
  t.join();
  EXPECT_EQ(answer.status, 200) << answer.body;
  EXPECT_EQ(json::parse(answer.body)["usage"]["completion_tokens"], 150);
  EXPECT_EQ(s.Wait(), 0);
  const std::string rest = s.Rest();
  EXPECT_NE(rest.find("stopped (drained)"), std::string::npos) << rest;
}

// A rank lost mid-stream: the stream ends with an error event (no hang), the launcher exits 1
// naming the rank.
TEST_F(ServerTest, LostRankEndsStreamsWithAnErrorAndTheLauncherExits) {
  const std::string model =
      (dir_->path() / "lm_lost").string();  // a path only this server's ranks show
  std::filesystem::create_directory_symlink(Lm(), model);
  Server s(model, Ranks() + " --linger-on-loss 3");
  ASSERT_TRUE(s.ok()) << s.ready_line();
  std::atomic<bool> started{false}, ended{false};
  bool error_event = false;
  std::thread t([&] {
    HttpCall call{"POST",
                  "/v1/completions",
                  R"({"prompt": "x", "max_tokens": 2000, "stream": true, "ignore_eos": true})",
                  {}};
    auto r = serving::HttpStream(s.url(), call, [&](std::string_view data) {
      started = true;
      error_event |= data.find("\"error\"") != std::string_view::npos;
      return true;
    });
    ended = true;
  });
  while (!started && !ended) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  if (!started) {
    t.join();
    FAIL() << "the stream ended before its first event";
  }
  const std::string victim = Cuda() ? "0" : "1";
  const std::string pid = Shell("pgrep -f -- '[-]-rank " + victim + " .*" + model + "'");
  ASSERT_FALSE(pid.empty());
  kill(std::atoi(pid.c_str()), SIGKILL);
  t.join();
  EXPECT_TRUE(error_event);
  const auto ready = s.Call("GET", "/ready", "", {});  // the server lingers, no longer ready
  EXPECT_EQ(ready.status, 503);
  EXPECT_NE(ready.body.find("rank " + victim + " lost"), std::string::npos) << ready.body;
  EXPECT_EQ(s.Wait(), 1);
  const std::string rest = s.Rest();
  EXPECT_NE(rest.find("rank " + victim + " lost"), std::string::npos) << rest;
}

}  // namespace
}  // namespace gemma2
