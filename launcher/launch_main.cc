// gemma2-launch: starts and wires a cluster — a coordinator (this process) and one gemma2-worker
// per rank — and serves it over HTTP with OpenAI's API (serving/). It is ready only after a real
// one-token generation went through every rank through the scheduler. Startup is all or nothing.
// SIGTERM or SIGINT drains: no new requests, in-flight ones finish (up to --drain-timeout), then
// every process stops and the exit code is 0. A lost rank fails the requests in flight, turns
// /ready false, stops the rest and exits 1 naming the rank.
//
//   gemma2-launch --model DIR --tp 4 --nodes 2 --port 8000   # tp 4 per node, 2 pipeline stages
//
// Built a second time as gemma2-coordinator (GEMMA2_COORDINATOR_ONLY): the same coordinator and
// server, no local workers; every rank's gemma2-worker is started elsewhere and joins at --master.
//
// Across hosts: per node (--master HOST:PORT --node-rank R, or Slurm's environment) or fanned out
// from the head node over ssh (--hosts); the tests run nodes as network namespaces of one machine.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <deque>
#include <map>
#include <mutex>
#include <optional>
#include <sstream>
#include <thread>

#include "common/gpu_inventory.h"
#include "common/log.h"
#include "coordinator/cluster.h"
#ifndef GEMMA2_COORDINATOR_ONLY
#include "engine/engine.h"
#endif
#include "model/weight_source.h"
#include "model/quantization.h"
#include "serving/http_server.h"
#include "cli/options.h"
#include "cli/run_tool.h"

namespace gemma2 {
namespace {

volatile sig_atomic_t g_stop = 0;
// How long a rank told to stop (SIGTERM) may take before it is killed.
// The main thread's nap between checks of a signal, a probe, the workers or a drain.
constexpr auto kPoll = std::chrono::milliseconds(20);
void OnSignal(int) { g_stop = 1; }

struct Args {
  std::string model, backend, host = "127.0.0.1", api_key, api_key_file, served_name;
  std::string tokenizer;  // --tokenizer: a sentencepiece model other than MODEL/tokenizer.model
  std::string quantization = "auto";
  std::string kv_cache_dtype = "auto";
  std::string trace;  // --trace: the scheduler's per-step timeline (Chrome trace format)
  int tp = 1, nodes = 1, pp = 0, port = 8000;
  int gpus_per_node = 0;  // 0: detect
  // Multi-host (per-node mode): every node runs gemma2-launch with the same --master and
  // --secret-file; node 0 is the coordinator, the others start their ranks and supervise them.
  int node_rank = -1;
  // gemma2-coordinator: start no worker; every rank's gemma2-worker is started by someone else
  // (a job scheduler, an operator) and joins at --master with the secret.
  bool external_workers = false;
  bool in_process = false;  // gemma2-launch --in-process: one Engine in this process, no workers
  const char* tool = "gemma2-launch";
  std::string master, secret_file, address;
  // Fan-out from the head node: one node launcher per further host, started over ssh.
  std::vector<std::string> hosts;
  int control_port = 29500;
  int micro_batches = 0;
  int pipeline_depth = 0;
  int64_t kv_blocks = 0, kv_block_size = 16;
  int64_t micro_batch_min_tokens = 256;
  std::string ssh = "ssh -o BatchMode=yes";
  ClusterTimeouts timeouts;
  double drain_timeout_s = 30, linger_on_loss_s = 1;
  int64_t write_timeout_s = 30;
  int max_connections = 0;  // 0: from the descriptor limit
  bool metrics_open = false;
  serving::SchedulerOptions sched;
  serving::Limits limits;
};

Result<std::string> ApiKey(const Args& a) {
  if (!a.api_key.empty() && !a.api_key_file.empty()) {
    return InvalidArgument("give --api-key or --api-key-file, not both");
  }
  if (a.api_key_file.empty()) return a.api_key;
  std::ifstream in(a.api_key_file);
  if (!in) return NotFound("--api-key-file " + a.api_key_file + ": cannot read it");
  std::string key;
  std::getline(in, key);
  if (key.empty())
    return InvalidArgument("--api-key-file " + a.api_key_file + ": the first line is empty");
  return key;
}

// One real token (or one classification) through the scheduler and every rank.
Status Probe(serving::Scheduler& scheduler, const ModelConfig& c) {
  serving::ParsedRequest r;
  r.endpoint = c.is_classifier() ? serving::Endpoint::kClassify : serving::Endpoint::kCompletions;
  r.prompts = {{static_cast<int32_t>(c.bos_token_id)}};
  r.gen.max_tokens = 1;
  r.gen.temperature = 0;
  auto h = std::make_shared<serving::RequestHandle>("probe", std::move(r));
  h->counted = false;
  if (auto e = scheduler.Submit(h)) return Status(StatusCode::kUnavailable, "probe: " + e->message);
  while (true) {
    {
      MutexLock lock(h->mu);
      if (h->done) {
        if (h->error) return Status(StatusCode::kUnavailable, "probe: " + h->error->message);
        return OkStatus();
      }
    }
    if (g_stop) return Status(StatusCode::kUnavailable, "stopped by a signal during startup");
    std::this_thread::sleep_for(kPoll);
  }
}

// "HOST:PORT" -> (host, port).
Result<std::pair<std::string, int>> HostPort(const std::string& s) {
  const auto colon = s.rfind(':');
  int port = 0;
  if (colon != std::string::npos) port = std::atoi(s.c_str() + colon + 1);
  if (colon == std::string::npos || colon == 0 || port <= 0 || port > 65535) {
    return InvalidArgument("--master " + s + ": expected HOST:PORT");
  }
  return std::pair{s.substr(0, colon), port};
}

// A node other than the coordinator's: starts this node's ranks, which connect to the master,
// and stays with them. Exits 0 when they all end cleanly (the coordinator shut them down), 1
// naming the rank when one fails; SIGTERM stops them.
Status RunNode(const Args& a, int world, const std::string& master) {
  const int per_node = world / a.nodes;
  if (a.backend == "cuda")
    RETURN_IF_ERROR(GpusForNode(a.node_rank, per_node, a.gpus_per_node).status());
  WorkerSpawn w;
  w.coordinator = master;
  w.model = a.model;
  w.backend = a.backend;
  w.quantization = a.quantization;
  w.kv_cache_dtype = a.kv_cache_dtype;
  w.secret_file = a.secret_file;
  w.address = a.address;
  w.tp = a.tp;
  w.pp = world / a.tp;
  w.timeouts = a.timeouts;
  std::map<pid_t, int> ranks;
  auto stop_all = [&](int sig) {
    for (const auto& [pid, rank] : ranks) kill(pid, sig);
  };
  for (int r = a.node_rank * per_node; r < (a.node_rank + 1) * per_node; ++r) {
    w.device = r - a.node_rank * per_node;  // one GPU per local rank
    auto pid = SpawnWorker(w, r);
    if (!pid.ok()) {
      stop_all(SIGKILL);
      return pid.status();
    }
    ranks[*pid] = r;
  }
  std::printf("gemma2-launch: node %d started ranks %d..%d for the coordinator at %s\n",
              a.node_rank, a.node_rank * per_node, (a.node_rank + 1) * per_node - 1,
              master.c_str());
  std::fflush(stdout);
  Status result;
  // Ranks told to stop get SIGKILL after a grace period: a stopped process never acts on SIGTERM.
  std::optional<std::chrono::steady_clock::time_point> kill_at;
  const auto stop_gracefully = [&] {
    stop_all(SIGTERM);
    if (!kill_at) kill_at = std::chrono::steady_clock::now() + a.timeouts.stop_grace;
  };
  while (!ranks.empty()) {
    if (g_stop) {
      stop_gracefully();
      g_stop = 0;
    }
    if (kill_at && std::chrono::steady_clock::now() > *kill_at) stop_all(SIGKILL);
    int status = 0;
    const pid_t pid = waitpid(-1, &status, WNOHANG);
    if (pid <= 0) {
      std::this_thread::sleep_for(kPoll);
      continue;
    }
    auto it = ranks.find(pid);
    if (it == ranks.end()) continue;
    const bool clean = WIFEXITED(status) && WEXITSTATUS(status) == 0;
    if (!clean && result.ok()) {
      result =
          Status(StatusCode::kUnavailable,
                 "rank " + std::to_string(it->second) + " on node " + std::to_string(a.node_rank) +
                     (WIFSIGNALED(status) ? " killed by signal " + std::to_string(WTERMSIG(status))
                                          : " exited with " + std::to_string(WEXITSTATUS(status))));
      stop_gracefully();  // the rest of this node goes too
    }
    ranks.erase(it);
  }
  return result;
}

std::string Quoted(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

// Starts node i's gemma2-launch on hosts[i] through `ssh HOST 'command'` (same paths on every
// host: this program, the model, the secret file). UCX_/NCCL_/GLOO_ settings travel along.
Result<pid_t> StartRemoteNode(const Args& a, size_t i, int* stderr_pipe) {
  std::string cmd = "exec";
  for (char** e = environ; *e; ++e) {
    const std::string kv = *e;
    if (kv.rfind("UCX_", 0) == 0 || kv.rfind("NCCL_", 0) == 0 || kv.rfind("GLOO_", 0) == 0) {
      if (cmd == "exec") cmd += " env";
      cmd += " " + Quoted(kv);
    }
  }
  const std::string self = std::filesystem::read_symlink("/proc/self/exe").string();
  for (const std::string& arg : {self,
                                 std::string("--model"),
                                 std::filesystem::absolute(a.model).string(),
                                 std::string("--tp"),
                                 std::to_string(a.tp),
                                 std::string("--nodes"),
                                 std::to_string(a.nodes),
                                 std::string("--backend"),
                                 a.backend,
                                 std::string("--quantization"),
                                 a.quantization,
                                 std::string("--kv-cache-dtype"),
                                 a.kv_cache_dtype,
                                 std::string("--gpus-per-node"),
                                 std::to_string(a.gpus_per_node),
                                 std::string("--node-rank"),
                                 std::to_string(i),
                                 std::string("--master"),
                                 a.master,
                                 std::string("--secret-file"),
                                 std::filesystem::absolute(a.secret_file).string(),
                                 std::string("--address"),
                                 a.hosts[i]}) {
    cmd += " " + Quoted(arg);
  }
  std::vector<std::string> argv_s;
  std::istringstream words(a.ssh);
  for (std::string w; words >> w;) argv_s.push_back(w);
  argv_s.push_back(a.hosts[i]);
  argv_s.push_back(cmd);
  return SpawnProcess(std::move(argv_s), "node " + std::to_string(i), stderr_pipe);
}

// A remote node's stderr (its ssh session): forwarded line by line to ours, prefixed with the
// node, and its last lines kept for an error that names the node.
class NodeOutput {
 public:
  NodeOutput(int fd, std::string node) : fd_(fd), node_(std::move(node)) {
    thread_ = std::thread([this] { Forward(); });
  }
  ~NodeOutput() {
    thread_.join();  // ends when the session closes its stderr (it is stopped first)
    close(fd_);
  }
  std::string Tail() {
    std::lock_guard<std::mutex> lock(mu_);
    std::string t;
    for (const auto& l : tail_) t += (t.empty() ? "" : " | ") + l;
    return t;
  }

 private:
  void Forward() {
    FILE* in = fdopen(dup(fd_), "r");
    if (!in) return;
    char buf[4096];
    while (fgets(buf, sizeof(buf), in)) {
      std::string line(buf);
      if (!line.empty() && line.back() == '\n') line.pop_back();
      log::Info(line, {{"node", node_}});  // the remote node's own words
      std::lock_guard<std::mutex> lock(mu_);
      tail_.push_back(line);
      if (tail_.size() > 3) tail_.pop_front();
    }
    fclose(in);
  }
  int fd_;
  std::string node_;
  std::mutex mu_;
  std::deque<std::string> tail_;
  std::thread thread_;
};

// cuda where this build has it and this node shows a GPU, else cpu.
std::string DefaultBackend() {
#ifdef GEMMA2_HAVE_CUDA
  if (VisibleGpuCount() > 0) return "cuda";
#endif
  return "cpu";
}

// The cluster of worker processes; a failed launch names what the remote nodes said.
Result<std::unique_ptr<ClusterEngine>> LaunchCluster(
    const ClusterOptions& co, const std::vector<std::unique_ptr<NodeOutput>>& remote_output) {
  auto launched = ClusterEngine::LaunchLocal(co);
  if (launched.ok()) return launched;
  // A remote node's own words (ssh's refusal, its launcher's error) say more than a timeout.
  std::string said;
  for (size_t i = 0; i < remote_output.size(); ++i) {
    if (const std::string t = remote_output[i]->Tail(); !t.empty())
      said += "; node " + std::to_string(i + 1) + " said: " + t;
  }
  return Status(launched.status().code(), launched.status().message() + said);
}

// --in-process: the ranks on threads of this process (engine/engine.h), no workers and no
// control plane: the same scheduler and server over the engine the offline tools use.
Result<std::unique_ptr<StepExecutor>> InProcessEngine(const Args& a, const ClusterOptions& co) {
#ifdef GEMMA2_COORDINATOR_ONLY
  return InvalidArgument("--in-process: gemma2-coordinator has no engine of its own");
#else
  if (co.pp != 1 || a.nodes != 1 || !a.master.empty() || !a.hosts.empty())
    return InvalidArgument("--in-process runs one process: no --pp, --nodes, --master or --hosts");
  ASSIGN_OR_RETURN(auto weights, OpenWeightSource(a.model));
  EngineOptions eo;
  eo.backend.name = a.backend;
  eo.tp = a.tp;
  eo.kv_blocks = a.kv_blocks;
  eo.kv_block_size = a.kv_block_size;
  ASSIGN_OR_RETURN(eo.quantization, ResolveQuantization(a.quantization, a.model));
  ASSIGN_OR_RETURN(eo.kv_cache_dtype, ParseKvCacheDtype(a.kv_cache_dtype));
  ASSIGN_OR_RETURN(auto engine, Engine::Create(*weights, eo));
  return std::unique_ptr<StepExecutor>(std::move(engine));
#endif
}

Status Run(Args a) {
  if (a.backend.empty()) a.backend = DefaultBackend();
  if (!a.hosts.empty()) {  // fan-out: this is node 0 of hosts[0..N)
    if (!a.master.empty())
      return InvalidArgument("give --hosts (fan-out) or --master (per-node), not both");
    if (a.nodes > 1 && a.nodes != static_cast<int>(a.hosts.size())) {
      return InvalidArgument("--nodes " + std::to_string(a.nodes) + " but " +
                             std::to_string(a.hosts.size()) + " --hosts");
    }
    a.nodes = static_cast<int>(a.hosts.size());
    a.master = a.hosts[0] + ":" + std::to_string(a.control_port);
    a.node_rank = 0;
    if (a.address.empty()) a.address = a.hosts[0];
  }
  // Slurm: one gemma2-launch per node, its node rank and the node count from the environment.
  if (const char* n = std::getenv("SLURM_NNODES"); n && a.nodes == 1 && !a.master.empty())
    a.nodes = std::atoi(n);
  if (const char* id = std::getenv("SLURM_NODEID"); id && a.node_rank < 0)
    a.node_rank = std::atoi(id);
  if (a.node_rank < 0) a.node_rank = 0;
  if (a.external_workers) a.node_rank = 0;
  ASSIGN_OR_RETURN(std::string key, ApiKey(a));
  struct sigaction sa {};
  sa.sa_handler = OnSignal;
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGINT, &sa, nullptr);
  ClusterOptions co;
  co.model = a.model;
  co.tp = a.tp;
  co.pp = a.pp > 0 ? a.pp : a.nodes;
  if (!a.master.empty()) {  // per-node mode
    const int world = co.tp * co.pp;
    if (a.secret_file.empty())
      return InvalidArgument("--master needs --secret-file (the same file on every node)");
    if (a.node_rank >= a.nodes) {
      return InvalidArgument("--node-rank " + std::to_string(a.node_rank) + " but --nodes " +
                             std::to_string(a.nodes));
    }
    if (world % a.nodes != 0) {
      return InvalidArgument(std::to_string(world) + " ranks do not split evenly over " +
                             std::to_string(a.nodes) + " nodes");
    }
    ASSIGN_OR_RETURN(auto hp, HostPort(a.master));
    if (a.address.empty()) a.address = a.node_rank == 0 ? hp.first : "";
    if (a.address.empty())
      return InvalidArgument("--address: this node's address for the collectives is needed");
    if (a.node_rank > 0) return RunNode(a, world, a.master);
    co.listen_host = hp.first;
    co.control_port = hp.second;
    co.secret_file = a.secret_file;
    co.spawn_begin = 0;
    co.spawn_end = a.external_workers ? 0 : world / a.nodes;
    co.nodes = {ClusterOptions::Node{{}, a.address}};
  }
  // The tokenizer before any rank starts: a file that is not one is refused at once.
  std::unique_ptr<Tokenizer> tokenizer;
  const auto tok_file = a.tokenizer.empty() ? std::filesystem::path(a.model) / "tokenizer.model"
                                            : std::filesystem::path(a.tokenizer);
  if (!a.tokenizer.empty() || std::filesystem::exists(tok_file)) {
    ASSIGN_OR_RETURN(tokenizer, Tokenizer::Load(tok_file));
  }
  std::vector<pid_t> remote;  // ssh sessions of the other nodes (fan-out)
  std::vector<std::unique_ptr<NodeOutput>> remote_output;
  struct RemoteReaper {
    std::vector<pid_t>& pids;
    std::vector<std::unique_ptr<NodeOutput>>& outputs;
    ~RemoteReaper() {
      for (pid_t p : pids) kill(p, SIGTERM);
      for (pid_t p : pids) waitpid(p, nullptr, 0);
      outputs.clear();  // after the sessions ended: their stderr is closed
    }
  } reaper{remote, remote_output};
  for (size_t i = 1; i < a.hosts.size(); ++i) {
    int err = -1;
    ASSIGN_OR_RETURN(pid_t pid, StartRemoteNode(a, i, &err));
    remote.push_back(pid);
    const std::string name = "node " + std::to_string(i) + " (" + a.hosts[i] + ")";
    remote_output.push_back(std::make_unique<NodeOutput>(err, name));
    co.watched.emplace_back(pid, name + "'s session (" + a.ssh + ")");
  }
  co.backend = a.backend;
  co.quantization = a.quantization;
  co.kv_cache_dtype = a.kv_cache_dtype;
  co.kv_blocks = a.kv_blocks;
  co.kv_block_size = a.kv_block_size;
  co.gpus_per_node = a.gpus_per_node;
  co.micro_batches = a.micro_batches;
  co.pipeline_depth = a.pipeline_depth;
  co.micro_batch_min_tokens = a.micro_batch_min_tokens;
  co.timeouts = a.timeouts;
  std::unique_ptr<ClusterEngine> cluster;
  std::unique_ptr<StepExecutor> local;  // --in-process
  if (a.in_process) {
    ASSIGN_OR_RETURN(local, InProcessEngine(a, co));
  } else {
    ASSIGN_OR_RETURN(cluster, LaunchCluster(co, remote_output));
  }
  StepExecutor& executor = cluster ? static_cast<StepExecutor&>(*cluster) : *local;
  const int world = cluster ? cluster->world() : co.tp;
  const ModelConfig& config = executor.config();

  if (tokenizer && tokenizer->vocab_size() > config.vocab_size) {
    return InvalidArgument(
        "the tokenizer " + tok_file.string() + " has " + std::to_string(tokenizer->vocab_size()) +
        " pieces, more than the model's vocabulary of " + std::to_string(config.vocab_size));
  }

  serving::Metrics metrics;
  if (cluster) {  // between steps, the cluster's heartbeats
    a.sched.idle_watch = [&](std::chrono::milliseconds d, const std::atomic<bool>* wake) {
      return cluster->Watch(d, wake);
    };
    a.sched.idle_wake = [&] { cluster->Wake(); };
  }
  std::unique_ptr<serving::StepTrace> trace;
  if (!a.trace.empty()) {
    ASSIGN_OR_RETURN(trace, serving::StepTrace::Open(a.trace));
    a.sched.trace = trace.get();
  }
  auto scheduler =
      std::make_unique<serving::Scheduler>(executor, tokenizer.get(), metrics, a.sched);
  serving::ModelFacts facts{
      &config, tokenizer.get(),
      a.served_name.empty() ? std::filesystem::path(a.model).filename().string() : a.served_name,
      a.limits};
  if (facts.served_name.empty())
    facts.served_name = std::filesystem::path(a.model).parent_path().filename();
  ASSIGN_OR_RETURN(const Quantization quantization, ResolveQuantization(a.quantization, a.model));
  facts.quantization = QuantizationName(quantization);
  ASSIGN_OR_RETURN(const KvCacheDtype kv_dtype, ParseKvCacheDtype(a.kv_cache_dtype));
  facts.kv_cache_dtype = KvCacheDtypeName(kv_dtype);
  serving::ServerOptions so;
  so.host = a.host;
  so.port = a.port;
  so.api_key = key;
  so.write_timeout = std::chrono::seconds(a.write_timeout_s);
  so.max_connections = a.max_connections;
  so.metrics_open = a.metrics_open;
  serving::HttpServer server(*scheduler, metrics, facts, so);
  RETURN_IF_ERROR(server.Start());
  RETURN_IF_ERROR(Probe(*scheduler, config));
  server.SetReady(true);
  std::printf(
      "%s: ready: %d ranks (tp %d x pp %d%s), model %s, KV budget %lld blocks of %lld, "
      "serving '%s' on http://%s:%d (version %s)\n",
      a.tool, world, co.tp, co.pp, a.in_process ? ", in process" : "", a.model.c_str(),
      static_cast<long long>(executor.kv_blocks()),
      static_cast<long long>(executor.kv_layout().block_size), facts.served_name.c_str(),
      a.host.c_str(), server.port(), VersionLine().c_str());
  std::fflush(stdout);
  log::Info("ready", {{"url", "http://" + a.host + ":" + std::to_string(server.port())},
                      {"ranks", std::to_string(world)},
                      {"model", facts.served_name},
                      {"quantization", facts.quantization},
                      {"kv_cache_dtype", facts.kv_cache_dtype},
                      {"version", VersionLine()}});

  while (!g_stop) {
    if (auto lost = scheduler->lost()) {
      server.SetReady(false);
      log::Error("cluster lost: " + lost->message());
      // Failed requests get their answers and probes see /ready false before the process goes.
      std::this_thread::sleep_for(
          std::chrono::milliseconds(static_cast<int64_t>(a.linger_on_loss_s * 1000)));
      server.Stop();
      return *lost;
    }
    std::this_thread::sleep_for(kPoll);
  }
  std::printf("%s: draining on signal\n", a.tool);
  log::Info("draining on signal", {{"timeout_s", std::to_string(a.drain_timeout_s)}});
  std::fflush(stdout);
  server.StopAccepting();
  scheduler->BeginDrain();
  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::milliseconds(static_cast<int64_t>(a.drain_timeout_s * 1000));
  while (!scheduler->Idle() && std::chrono::steady_clock::now() < deadline && !scheduler->lost()) {
    std::this_thread::sleep_for(kPoll);
  }
  // The last answers leave their sockets before the server stops.
  const bool drained = scheduler->Idle() && server.WaitForResponses(deadline);
  scheduler.reset();  // requests still open end with 503
  server.Stop();
  log::Info(drained ? "stopped (drained)" : "stopped (drain timeout: open requests failed)");
  std::printf("%s: stopped (%s)\n", a.tool,
              drained ? "drained" : "drain timeout: open requests failed");
  std::fflush(stdout);
  return OkStatus();  // the cluster's destructor stops every worker
}

}  // namespace
}  // namespace gemma2

// CLI11 throws while flags are declared only on a programming error (a flag added twice); every
// failure after that (parsing, running) becomes one line from RunTool.
int main(int argc, char** argv) {  // NOLINT(bugprone-exception-escape)
  gemma2::Args a;
#ifdef GEMMA2_COORDINATOR_ONLY
  a.external_workers = true;
  a.tool = "gemma2-coordinator";
  CLI::App app{
      "gemma2-coordinator: the coordinator of a gemma2 cluster whose workers are started elsewhere "
      "(gemma2-worker --coordinator HOST:PORT --rank R ... with the same --secret-file); serves "
      "it over HTTP once every rank has joined"};
#else
  CLI::App app{
      "gemma2-launch: start a gemma2 cluster (coordinator + one worker per rank) and serve it over "
      "HTTP"};
#endif
  gemma2::cli::AddModel(app, a.model)->required();
  gemma2::cli::AddTp(app, a.tp, "per node");
  app.add_option("--nodes", a.nodes, "nodes (pipeline stages across nodes)")
      ->check(CLI::Range(1, 1024));
  gemma2::cli::AddPp(app, a.pp,
                     "0: --nodes; the tp x pp ranks split evenly over the nodes in rank order, so "
                     "--pp 1 --nodes 2 runs one tensor-parallel group across both nodes",
                     /*min_pp=*/0);
  gemma2::cli::AddBackend(app, a.backend,
                          "NCCL between GPU ranks; default: cuda where this node shows a GPU");
  gemma2::cli::AddQuantization(app, a.quantization);
  gemma2::cli::AddKvCacheDtype(app, a.kv_cache_dtype);
  app.add_option("--gpus-per-node", a.gpus_per_node,
                 "GPUs each node may use, one per rank (default: detected from "
                 "CUDA_VISIBLE_DEVICES or /dev/nvidiaN)")
      ->check(CLI::Range(0, 1024));
  app.add_option("--node-rank", a.node_rank,
                 "this node's index with --master (default: $SLURM_NODEID, else 0)");
  app.add_option("--master", a.master,
                 "HOST:PORT of node 0's control plane: one gemma2-launch per node");
  app.add_option("--secret-file", a.secret_file,
                 "the cluster secret (same file on every node; with --master)");
  app.add_option("--hosts", a.hosts,
                 "fan-out: the nodes' addresses, this host first; the others start over ssh")
      ->delimiter(',');
  app.add_option("--control-port", a.control_port, "the control plane's port with --hosts");
  app.add_option("--ssh", a.ssh, "the command that runs a command on another host (--hosts)");
  app.add_option("--address", a.address,
                 "this node's address the collectives bind to (with --master)");
  app.add_option("--pipeline-depth", a.pipeline_depth,
                 "steps in flight at once over disjoint sequences, so pipeline stages work on "
                 "different steps (0: one per stage; 1: one step at a time)")
      ->check(CLI::Range(0, 64));
  app.add_option("--micro-batches", a.micro_batches,
                 "micro-batches per step through the pipeline stages (0: one per stage)")
      ->check(CLI::Range(0, 1024));
  app.add_option("--micro-batch-min-tokens", a.micro_batch_min_tokens,
                 "steps with fewer tokens are not split into micro-batches");
  gemma2::cli::AddClusterTimeouts(app, a.timeouts);
  app.add_option("--tokenizer", a.tokenizer,
                 "sentencepiece model for text, chat and structured output (default: "
                 "MODEL/tokenizer.model, where there is one; random weights have none)");
#ifndef GEMMA2_COORDINATOR_ONLY
  app.add_flag("--in-process", a.in_process,
               "serve from an engine in this process (ranks on threads, no worker processes, no "
               "control plane): the single-process path to compare the cluster with");
#endif
  app.add_option("--host", a.host, "HTTP address to bind (default 127.0.0.1: this machine only)");
  app.add_option("--port", a.port, "HTTP port (0: any free port; the ready line names it)")
      ->check(CLI::Range(0, 65535));
  app.add_option("--api-key", a.api_key,
                 "require 'Authorization: Bearer KEY' (all routes but /health, /ready)");
  app.add_option("--api-key-file", a.api_key_file,
                 "read the API key from the first line of this file");
  app.add_option("--write-timeout", a.write_timeout_s,
                 "seconds a client may leave a response or stream chunk unread before it is cut")
      ->check(CLI::Range(int64_t{1}, int64_t{86400}));
  app.add_option("--max-connections", a.max_connections,
                 "open HTTP connections at most; past it 503 at once (0: the descriptor limit "
                 "less 128)")
      ->check(CLI::Range(0, 1 << 24));
  app.add_flag("--metrics-open", a.metrics_open,
               "serve /metrics without the API key (for a Prometheus scraper)");
  app.add_option("--served-model-name", a.served_name,
                 "the model name clients send (default: the directory name)");
  app.add_option("--drain-timeout", a.drain_timeout_s,
                 "seconds SIGTERM waits for requests in flight");
  app.add_option("--linger-on-loss", a.linger_on_loss_s,
                 "seconds the server stays up (not ready) after a rank is lost");
  app.add_option("--max-running", a.sched.max_running, "sequences in the running batch")
      ->check(CLI::Range(1, 1 << 20));
  app.add_option("--max-queue", a.sched.max_queue, "waiting requests before 429")
      ->check(CLI::Range(1, 1 << 20));
  app.add_option("--trace", a.trace,
                 "write every step's phases (schedule, submit, step, apply) here as a Chrome "
                 "trace (chrome://tracing, Perfetto)");
  app.add_option("--max-step-tokens", a.sched.max_step_tokens,
                 "tokens per step (decode + prefill chunks)")
      ->check(CLI::Range(1, 1 << 20));
  app.add_option("--kv-blocks", a.kv_blocks,
                 "KV-cache blocks of every rank (0: what each GPU's memory allows; cpu: 65536)")
      ->check(CLI::Range(0, 1 << 30));
  app.add_option("--block-size", a.kv_block_size, "positions per KV block")
      ->check(CLI::Range(int64_t{1}, gemma2::rpc::kMaxKvBlockSize));
  app.add_option("--prefix-cache-entries", a.sched.prefix_cache_entries,
                 "finished prompts kept as reusable KV prefixes (0: no prefix caching)");
  app.add_option("--max-body-bytes", a.limits.max_body_bytes, "largest request body");
  bool lenient = false, strict_compat = false;
  app.add_flag("--lenient-fields", lenient,
               "ignore request fields this server does not honour (default: a 400 naming them)");
  app.add_flag("--strict-fields", strict_compat, "the default; kept for older command lines");
  app.callback([&] { a.limits.strict_fields = !lenient; });
  if (a.external_workers) {
    app.get_option("--master")
        ->required()
        ->description("HOST:PORT the control plane listens on; every worker connects there");
    app.get_option("--secret-file")->required();
  }
  return gemma2::RunTool(a.tool, app, argc, argv, [&] { return gemma2::Run(a); });
}
