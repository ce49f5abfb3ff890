#include "coordinator/cluster.h"

#include <linux/close_range.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>

#include "common/gpu_inventory.h"
#include "common/log.h"
#include "model/checkpoint.h"
#include "model/sharding.h"
#include "rpc/auth.h"
#include "rpc/bootstrap.h"

namespace gemma2 {
namespace {

using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

// The startup's wait for the next worker to join, between checks of the deadline and of the
// processes it watches.
constexpr auto kJoinPoll = 200ms;

std::string HexOf(const rpc::Nonce& n) {
  static const char* d = "0123456789abcdef";
  std::string s;
  for (uint8_t b : n) {
    s += d[b >> 4];
    s += d[b & 15];
  }
  return s;
}

}  // namespace

Result<pid_t> SpawnWorker(const WorkerSpawn& w, int rank) {
  std::string worker = w.worker_binary;
  if (worker.empty()) {
    worker =
        (std::filesystem::read_symlink("/proc/self/exe").parent_path() / "gemma2-worker").string();
  }
  std::vector<std::string> argv_s = w.exec_prefix;
  for (const std::string& arg : {worker,
                                 std::string("--coordinator"),
                                 w.coordinator,
                                 std::string("--rank"),
                                 std::to_string(rank),
                                 std::string("--tp"),
                                 std::to_string(w.tp),
                                 std::string("--pp"),
                                 std::to_string(w.pp),
                                 std::string("--model"),
                                 w.model,
                                 std::string("--secret-file"),
                                 w.secret_file,
                                 std::string("--backend"),
                                 w.backend,
                                 std::string("--threads"),
                                 std::to_string(w.threads),
                                 std::string("--address"),
                                 w.address,
                                 std::string("--device"),
                                 std::to_string(w.device),
                                 std::string("--quantization"),
                                 w.quantization,
                                 std::string("--kv-cache-dtype"),
                                 w.kv_cache_dtype}) {
    argv_s.push_back(arg);
  }
  const auto seconds = [](std::chrono::milliseconds d) { return std::to_string(d.count() / 1000.0); };
  for (const auto& [flag, d] : {std::pair{"--step-timeout", w.timeouts.step},
                                {"--startup-timeout", w.timeouts.startup},
                                {"--heartbeat-timeout", w.timeouts.heartbeat}}) {
    argv_s.push_back(flag);
    argv_s.push_back(seconds(d));
  }
  if (w.tie_to_parent) {
    argv_s.push_back("--parent-pid");
    argv_s.push_back(std::to_string(getpid()));
  }
  return SpawnProcess(std::move(argv_s), "rank " + std::to_string(rank));
}

Result<pid_t> SpawnProcess(std::vector<std::string> argv_s, const std::string& what,
                           int* stderr_pipe) {
  int err[2] = {-1, -1};
  if (stderr_pipe && pipe2(err, O_CLOEXEC) != 0) return Internal("pipe for " + what + "'s stderr");
  // Signals stay blocked across fork, so none reaches the child while it still runs this process's
  // handlers (a SIGTERM then would be taken by them and lost); the child resets every handler
  // before it unblocks, as posix_spawn's SETSIGDEF does.
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_BLOCK, &all, &old);
  const pid_t pid = fork();
  if (pid != 0) pthread_sigmask(SIG_SETMASK, &old, nullptr);
  if (pid < 0) {
    if (stderr_pipe) {
      close(err[0]);
      close(err[1]);
    }
    return Internal("fork failed while starting " + what);
  }
  if (pid == 0) {
    for (int sig = 1; sig < NSIG; ++sig) signal(sig, SIG_DFL);
    sigset_t none;
    sigemptyset(&none);
    pthread_sigmask(SIG_SETMASK, &none, nullptr);
    if (stderr_pipe) dup2(err[1], 2);
    std::vector<char*> argv;
    for (auto& a : argv_s) argv.push_back(a.data());
    argv.push_back(nullptr);
    // Nothing this process holds open (listening sockets, UCX's descriptors) reaches the child.
    close_range(3, ~0U, 0);
    execvp(argv[0], argv.data());
    _exit(127);
  }
  if (stderr_pipe) {
    close(err[1]);
    *stderr_pipe = err[0];
  }
  return pid;
}

Result<std::unique_ptr<ClusterEngine>> ClusterEngine::LaunchLocal(const ClusterOptions& opts) {
  std::unique_ptr<ClusterEngine> c(new ClusterEngine());
  RETURN_IF_ERROR(c->Start(opts));  // on failure the destructor stops what was started
  return c;
}

Status ClusterEngine::Start(const ClusterOptions& opts) {
  opts_ = opts;
  wake_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (wake_fd_ < 0) return Internal("eventfd for the coordinator's idle wait");
  ASSIGN_OR_RETURN(auto ck, OpenWeightSource(opts.model));  // a directory or random:SHAPE:SEED
  config_ = ck->config();
  const int world = opts.tp * opts.pp;
  for (int r = 0; r < world; ++r) {
    RETURN_IF_ERROR(ShardPlan::Make(config_, opts.tp, r % opts.tp, opts.pp, r / opts.tp).status());
  }
  if (opts.kv_block_size < 1 || opts.kv_block_size > rpc::kMaxKvBlockSize || opts.kv_blocks < 0) {
    return InvalidArgument("KV cache: block size " + std::to_string(opts.kv_block_size) + " (1.." +
                           std::to_string(rpc::kMaxKvBlockSize) + ") and " +
                           std::to_string(opts.kv_blocks) + " blocks (0: what memory allows)");
  }
  // What every rank's pool is asked for, read from the rendezvous store before it reports ready.
  store_["kv-cache"] = rpc::EncodeKvCapacity({opts.kv_blocks, opts.kv_block_size});
  // A private directory for a fresh secret (0600), named after this process; it goes once every
  // rank has read the secret and joined, so a coordinator killed later leaves nothing in /tmp.
  std::string tmpl = "/tmp/gemma2-cluster-" + std::to_string(getpid()) + "-XXXXXX";
  if (!mkdtemp(tmpl.data())) return Internal("cannot create a working directory in /tmp");
  work_dir_ = tmpl;
  // The secret: the operator's file on every node, or a fresh one for local ranks only.
  std::string secret_file = opts.secret_file, secret_text;
  if (secret_file.empty()) {
    ASSIGN_OR_RETURN(rpc::Nonce secret, rpc::FreshNonce());
    secret_text = HexOf(secret);
    secret_file = work_dir_ + "/secret";
    std::ofstream(secret_file) << secret_text;
    std::filesystem::permissions(
        secret_file, std::filesystem::perms::owner_read | std::filesystem::perms::owner_write);
  } else {
    std::ifstream in(secret_file, std::ios::binary);
    if (!in) return NotFound("cannot read the cluster secret file " + secret_file);
    secret_text.assign(std::istreambuf_iterator<char>(in), {});
    if (secret_text.size() < 16)
      return InvalidArgument("cluster secret in " + secret_file + " is shorter than 16 bytes");
  }
  const std::string wrong_file = work_dir_ + "/wrong-secret";  // tests: a rank that must be refused
  if (opts.wrong_secret_rank >= 0) std::ofstream(wrong_file) << std::string(64, 'x');

  ASSIGN_OR_RETURN(node_, rpc::UcxNode::Create(opts.listen_host));
  const std::vector<uint8_t> secret_bytes(secret_text.begin(), secret_text.end());
  rpc::BootstrapListener::Options lo;
  lo.host = opts.listen_host;
  lo.port = opts.control_port;
  lo.secret = secret_bytes;
  lo.world = static_cast<uint32_t>(world);
  lo.ucx_address = node_->address();
  lo.log = [](const std::string& line) { log::Warn(line); };  // a refused peer: warn, go on
  ASSIGN_OR_RETURN(auto listener, rpc::BootstrapListener::Listen(std::move(lo)));
  const int port = listener->port();
  const int spawn_end = opts.spawn_end < 0 ? world : opts.spawn_end;
  // Ranks per node: this process's whole range, or equal blocks over the test topology's nodes.
  const int node_ranks = opts.nodes.size() > 1 ? (world + static_cast<int>(opts.nodes.size()) - 1) /
                                                     static_cast<int>(opts.nodes.size())
                                               : spawn_end - opts.spawn_begin;
  if (opts.backend == "cuda" && spawn_end > opts.spawn_begin) {
    RETURN_IF_ERROR(
        GpusForNode(0, std::min(node_ranks, spawn_end - opts.spawn_begin), opts.gpus_per_node)
            .status());
  }
  for (int r = opts.spawn_begin; r < spawn_end; ++r) {
    const ClusterOptions::Node node =
        opts.nodes.empty() ? ClusterOptions::Node{}
                           : opts.nodes[static_cast<size_t>(
                                 r / ((world + static_cast<int>(opts.nodes.size()) - 1) /
                                      static_cast<int>(opts.nodes.size())))];
    WorkerSpawn w;
    w.worker_binary = opts.worker_binary;
    w.coordinator = opts.listen_host + ":" + std::to_string(port);
    w.model = opts.model;
    w.backend = opts.backend;
    w.quantization = opts.quantization;
    w.kv_cache_dtype = opts.kv_cache_dtype;
    w.secret_file = r == opts.wrong_secret_rank ? wrong_file : secret_file;
    w.address = node.address;
    w.tp = opts.tp;
    w.pp = opts.pp;
    w.threads = opts.threads_per_worker;
    w.exec_prefix = node.exec_prefix;
    w.device = (r - opts.spawn_begin) % node_ranks;  // one GPU per rank of its node
    w.timeouts = opts.timeouts;
    ASSIGN_OR_RETURN(pid_t pid, SpawnWorker(w, r));
    pids_.push_back(pid);
    pid_names_.push_back("rank " + std::to_string(r));
    pid_ranks_.push_back(r);
  }
  // Handshakes (rpc/bootstrap.h): a peer that fails one is refused alone and startup goes on; a
  // worker this process started that exits first ends the startup at once, naming it.
  ranks_.resize(static_cast<size_t>(world));
  std::vector<bool> joined(static_cast<size_t>(world), false);
  const auto deadline = Clock::now() + opts.timeouts.startup;
  for (int accepted = 0; accepted < world;) {
    RETURN_IF_ERROR(Fail(CheckChildren("startup")));
    if (Clock::now() > deadline) {
      std::string missing;
      for (int r = 0; r < world; ++r) {
        if (!joined[static_cast<size_t>(r)]) missing += (missing.empty() ? "" : ", ") + std::to_string(r);
      }
      return Fail(Status(StatusCode::kDeadlineExceeded,
                         "startup: rank(s) " + missing + " never joined within " +
                             std::to_string(opts.timeouts.startup.count()) + " ms"));
    }
    auto next = listener->Next(kJoinPoll, joined);
    if (!next.ok()) return Fail(next.status().WithContext("startup"));
    if (!next->has_value()) continue;
    const rpc::Joined& j = **next;
    auto ch = node_->ConnectTo(j.ucx_address, j.peer);
    if (!ch.ok()) return Fail(ch.status().WithContext("startup: rank " + std::to_string(j.rank)));
    ranks_[j.rank] = std::move(ch).value();
    joined[j.rank] = true;
    ++accepted;
  }
  listener.reset();  // nobody else may join: the port closes
  RemoveWorkDir();   // every worker read its secret before it could join
  // Each rank loads its shard and joins the collective, then reports ready (or why not).
  auto ready = CollectAll(opts.timeouts.startup, "startup");
  if (!ready.ok()) return ready.status();
  int64_t blocks = std::numeric_limits<int64_t>::max();
  for (int r = 0; r < world; ++r) {
    const rpc::Received& m = (*ready)[static_cast<size_t>(r)];
    if (m.type != rpc::MessageType::kHeartbeat) {
      return Fail(Internal("startup: rank " + std::to_string(r) + " sent an unexpected message"));
    }
    auto kv = rpc::DecodeKvCapacity(m.payload);
    if (!kv.ok()) return Fail(kv.status().WithContext("startup: rank " + std::to_string(r)));
    blocks = std::min(blocks, kv->blocks);
  }
  kv_ = std::make_unique<KvBlockTables>(KvLayout::For(config_, opts.kv_block_size), blocks);
  return OkStatus();
}

Status ClusterEngine::CheckChildren(const char* what) {
  // Own workers are reaped here; the caller's watched processes are only looked at (WNOWAIT):
  // their owner reaps them.
  auto check = [&](pid_t& pid, const std::string& name, bool reap) -> Status {
    siginfo_t info{};
    if (pid <= 0 || waitid(P_PID, static_cast<id_t>(pid), &info,
                           WEXITED | WNOHANG | (reap ? 0 : WNOWAIT)) != 0 ||
        info.si_pid != pid) {
      return OkStatus();
    }
    const pid_t was = pid;
    pid = -1;  // ended: not looked at again
    const std::string how = info.si_code == CLD_EXITED
                                ? "exited with status " + std::to_string(info.si_status)
                                : "was killed by signal " + std::to_string(info.si_status);
    return Status(StatusCode::kUnavailable,
                  std::string(what) + ": " + name + " (pid " + std::to_string(was) + ") " + how);
  };
  for (size_t i = 0; i < pids_.size(); ++i) RETURN_IF_ERROR(check(pids_[i], pid_names_[i], true));
  for (auto& [pid, name] : opts_.watched) RETURN_IF_ERROR(check(pid, name, false));
  return OkStatus();
}

Status ClusterEngine::Fail(Status st) {
  if (!st.ok() && down_.ok()) {
    down_ = st;
    // The survivors stop now rather than at their heartbeat timeout (this process may stay up a
    // while to answer its clients).
    for (auto& ch : ranks_) {
      if (ch && !ch->broken()) (void)ch->Send(rpc::MessageType::kShutdown, {}, opts_.timeouts.failure_send);
    }
  }
  return st;
}

Result<std::vector<rpc::Received>> ClusterEngine::CollectAll(std::chrono::milliseconds timeout,
                                                             const char* what) {
  const size_t n = ranks_.size();
  for (size_t r = 0; r < n; ++r) {
    const Status st = ranks_[r]->StartReceive();
    if (!st.ok()) return Fail(st.WithContext(std::string(what) + ": rank " + std::to_string(r)));
  }
  std::vector<rpc::Received> got(n);
  std::vector<bool> done(n, false);
  size_t remaining = n;
  const auto deadline = Clock::now() + timeout;
  // During a step every rank's control thread still answers heartbeats, so one that stopped is
  // found within the heartbeat timeout and named. Not during startup: ranks load their shards on
  // that thread (the startup timeout bounds it).
  const bool startup = std::string(what) == "startup";
  while (remaining > 0) {
    if (!startup) RETURN_IF_ERROR(Heartbeats(done, what));
    const size_t remaining_before = remaining;
    for (size_t r = 0; r < n; ++r) {
      if (done[r]) continue;
      auto ready = ranks_[r]->Poll();
      if (!ready.ok()) {
        return Fail(ready.status().WithContext(std::string(what) + ": rank " + std::to_string(r) +
                                               " lost"));
      }
      if (!*ready) continue;
      got[r] = ranks_[r]->Take();
      if (got[r].type == rpc::MessageType::kStoreSet ||
          got[r].type == rpc::MessageType::kStoreGet) {
        // The collectives' rendezvous: ranks meet through this process, then answer.
        RETURN_IF_ERROR(
            Fail(ServeStore(r, got[r]).WithContext("rank " + std::to_string(r) + ": rendezvous")));
        const Status st = ranks_[r]->StartReceive();
        if (!st.ok())
          return Fail(st.WithContext(std::string(what) + ": rank " + std::to_string(r)));
        continue;
      }
      if (got[r].type == rpc::MessageType::kHeartbeat && !startup) {
        // A late answer to a heartbeat asked between steps: the step's answer follows.
        heartbeat_sent_[r].reset();
        const Status st = ranks_[r]->StartReceive();
        if (!st.ok())
          return Fail(st.WithContext(std::string(what) + ": rank " + std::to_string(r)));
        continue;
      }
      if (got[r].type == rpc::MessageType::kError) {
        Status remote;
        (void)rpc::DecodeStatus(got[r].payload, &remote);
        const Status failed(
            remote.code() == StatusCode::kOk ? StatusCode::kInternal : remote.code(),
            std::string(what) + ": rank " + std::to_string(r) + " failed: " + remote.message());
        // A collective fails on every survivor when one rank dies: give the dead rank's channel a
        // moment to show it, and name that rank rather than a survivor.
        const auto grace = Clock::now() + opts_.timeouts.blame_grace;
        while (Clock::now() < grace) {
          for (size_t other = 0; other < n; ++other) {
            if (other == r || done[other]) continue;
            auto alive = ranks_[other]->Poll();
            if (!alive.ok()) {
              return Fail(alive.status().WithContext(
                  std::string(what) + ": rank " + std::to_string(other) + " lost (rank " +
                  std::to_string(r) + " saw: " + remote.message() + ")"));
            }
          }
        }
        return Fail(failed);
      }
      done[r] = true;
      --remaining;
      if (r < heartbeat_sent_.size()) heartbeat_sent_[r].reset();  // its answer is read later
    }
    // Nothing arrived this round: sleep on the node's events instead of spinning.
    if (remaining == remaining_before) node_->WaitForEvents(std::chrono::milliseconds(1));
    if (remaining > 0 && Clock::now() > deadline) {
      std::string missing;
      for (size_t r = 0; r < n; ++r) {
        if (!done[r]) missing += (missing.empty() ? "" : ", ") + std::to_string(r);
      }
      return Fail(Status(StatusCode::kDeadlineExceeded,
                         std::string(what) + ": no answer from rank(s) " + missing + " within " +
                             std::to_string(timeout.count()) + " ms (hung?)"));
    }
  }
  return got;
}

Status ClusterEngine::ServeStore(size_t rank, const rpc::Received& m) {
  rpc::Reader rd(m.payload);
  std::string key;
  RETURN_IF_ERROR(rd.Str(&key, rpc::kMaxStoreKey));
  auto answer = [&](size_t to) {
    rpc::Writer w;
    w.Str(key);
    w.Bytes(store_[key]);
    return ranks_[to]->Send(rpc::MessageType::kStoreValue, w.out(), opts_.timeouts.control_send);
  };
  if (m.type == rpc::MessageType::kStoreSet) {
    std::vector<uint8_t> value;
    RETURN_IF_ERROR(rd.Bytes(&value, rpc::kMaxPayload));
    RETURN_IF_ERROR(rd.Done());
    if (store_.size() >= 16 * ranks_.size() + 64 && !store_.count(key)) {
      return InvalidArgument("too many rendezvous keys");
    }
    store_[key] = std::move(value);
    for (size_t waiter : store_waiters_[key]) RETURN_IF_ERROR(answer(waiter));
    store_waiters_.erase(key);
    return OkStatus();
  }
  RETURN_IF_ERROR(rd.Done());
  if (store_.count(key)) return answer(rank);
  store_waiters_[key].push_back(rank);
  return OkStatus();
}

ClusterEngine::~ClusterEngine() {
  if (wake_fd_ >= 0) close(wake_fd_);
  for (auto& ch : ranks_) {
    if (ch && !ch->broken()) (void)ch->Send(rpc::MessageType::kShutdown, {}, opts_.timeouts.goodbye_send);
  }
  // A worker that never joined cannot be told: it is stopped at once.
  for (size_t i = 0; i < pids_.size(); ++i) {
    const size_t rank = static_cast<size_t>(pid_ranks_[i]);
    if (pids_[i] > 0 && (rank >= ranks_.size() || !ranks_[rank])) kill(pids_[i], SIGTERM);
  }
  // Give workers a moment to exit on their own, then make sure.
  const auto deadline = Clock::now() + opts_.timeouts.stop_grace;
  for (pid_t pid : pids_) {
    if (pid <= 0) continue;  // already reaped
    int status = 0;
    while (waitpid(pid, &status, WNOHANG) == 0) {
      if (Clock::now() > deadline) {
        kill(pid, SIGKILL);
        waitpid(pid, &status, 0);
        break;
      }
      if (node_) node_->Progress();
      usleep(1000);
    }
  }
  ranks_.clear();
  RemoveWorkDir();
}

void ClusterEngine::RemoveWorkDir() {
  if (work_dir_.empty()) return;
  std::error_code ec;
  std::filesystem::remove_all(work_dir_, ec);
  work_dir_.clear();
}

Status ClusterEngine::Heartbeats(const std::vector<bool>& answered, const char* what) {
  const size_t n = ranks_.size();
  heartbeat_sent_.resize(n);
  heartbeat_last_.resize(n);
  const auto now = Clock::now();
  for (size_t r = 0; r < n; ++r) {
    // Every rank hears from this process each interval (a worker leaves after heartbeat_timeout of
    // silence); one whose answers are read now gets the next only once it answered.
    const bool awaited = !answered[r];
    const bool due = now - heartbeat_last_[r] >= opts_.timeouts.heartbeat_interval;
    if (due && !(awaited && heartbeat_sent_[r])) {
      const Status st = ranks_[r]->Send(rpc::MessageType::kHeartbeat, {}, opts_.timeouts.heartbeat);
      if (!st.ok()) return Fail(st.WithContext(std::string(what) + ": rank " + std::to_string(r) + " lost"));
      heartbeat_last_[r] = now;
      if (!heartbeat_sent_[r]) heartbeat_sent_[r] = now;
    }
    if (awaited && heartbeat_sent_[r] && now - *heartbeat_sent_[r] > opts_.timeouts.heartbeat) {
      return Fail(Status(StatusCode::kDeadlineExceeded,
                         std::string(what) + ": rank " + std::to_string(r) +
                             " has not answered a heartbeat for " +
                             std::to_string(opts_.timeouts.heartbeat.count()) +
                             " ms (stopped, hung or unreachable)"));
    }
  }
  return OkStatus();
}

void ClusterEngine::Wake() {
  const uint64_t one = 1;
  if (wake_fd_ >= 0) (void)!write(wake_fd_, &one, sizeof(one));
}

Status ClusterEngine::Watch(std::chrono::milliseconds duration, const std::atomic<bool>* stop) {
  if (!down_.ok()) return down_;
  for (size_t r = 0; r < ranks_.size(); ++r) {
    const Status st = ranks_[r]->StartReceive();
    if (!st.ok()) return Fail(st.WithContext("rank " + std::to_string(r) + " lost"));
  }
  const std::vector<bool> none_answered(ranks_.size(), false);
  const auto deadline = Clock::now() + duration;
  while (Clock::now() < deadline && !(stop && *stop)) {
    RETURN_IF_ERROR(Heartbeats(none_answered, "idle"));
    for (size_t r = 0; r < ranks_.size(); ++r) {
      auto ready = ranks_[r]->Poll();
      if (!ready.ok())
        return Fail(ready.status().WithContext("rank " + std::to_string(r) + " lost"));
      if (!*ready) continue;
      const rpc::Received m = ranks_[r]->Take();
      if (m.type == rpc::MessageType::kHeartbeat) {
        heartbeat_sent_[r].reset();
        const Status st = ranks_[r]->StartReceive();
        if (!st.ok()) return Fail(st.WithContext("rank " + std::to_string(r) + " lost"));
        continue;
      }
      Status remote(StatusCode::kInternal, "an unasked message");
      if (m.type == rpc::MessageType::kError) (void)rpc::DecodeStatus(m.payload, &remote);
      return Fail(Status(StatusCode::kInternal,
                         "rank " + std::to_string(r) + " failed: " + remote.message()));
    }
    // Asleep until a frame arrives, Wake() is called, the next heartbeat round or the deadline.
    auto until = deadline;
    for (const auto& last : heartbeat_last_) until = std::min(until, last + opts_.timeouts.heartbeat_interval);
    const auto nap = std::chrono::duration_cast<std::chrono::microseconds>(until - Clock::now());
    node_->WaitForEvents(std::clamp(nap, std::chrono::microseconds(100),
                                    std::chrono::microseconds(100000)),
                         wake_fd_);
    uint64_t drained;
    (void)!read(wake_fd_, &drained, sizeof(drained));
  }
  return OkStatus();
}

int64_t ClusterEngine::NewSequence() {
  const int64_t id = next_id_++;
  lengths_[id] = 0;
  return id;
}

void ClusterEngine::ReleaseSequence(int64_t id) {
  if (!lengths_.erase(id)) return;
  kv_->Release(id);
  released_.push_back(id);  // the ranks free it with the next step
}

int64_t ClusterEngine::SequenceLength(int64_t id) const {
  auto it = lengths_.find(id);
  return it == lengths_.end() ? -1 : it->second;
}

// Micro-batches for the pipeline: up to `micro_batches` contiguous groups of the plan's sequences
// with about equal tokens. The first carries the plan's KV copies.
std::vector<StepPlan> ClusterEngine::SplitForPipeline(const StepPlan& plan) const {
  const size_t want = static_cast<size_t>(opts_.micro_batches > 0 ? opts_.micro_batches : opts_.pp);
  const size_t n = std::min(want, plan.sequences.size());
  if (opts_.pp == 1 || n <= 1 || plan.total_tokens() < opts_.micro_batch_min_tokens) return {plan};
  std::vector<StepPlan> parts(n);
  for (auto& p : parts) p.ids_only = plan.ids_only;
  parts[0].kv_copies = plan.kv_copies;
  const double per_part = static_cast<double>(plan.total_tokens()) / static_cast<double>(n);
  int64_t done = 0;
  size_t part = 0;
  for (size_t i = 0; i < plan.sequences.size(); ++i) {
    // Move on once this part has its share, keeping one sequence for every part still to fill.
    const size_t left = plan.sequences.size() - i;
    if (part + 1 < n && !parts[part].sequences.empty() &&
        (static_cast<double>(done) >= per_part * static_cast<double>(part + 1) ||
         left <= n - part - 1)) {
      ++part;
    }
    parts[part].sequences.push_back(plan.sequences[i]);
    done += static_cast<int64_t>(plan.sequences[i].tokens.size());
  }
  return parts;
}

int ClusterEngine::pipeline_depth() const {
  return opts_.pipeline_depth > 0 ? opts_.pipeline_depth : opts_.pp;
}

Result<StepOutput> ClusterEngine::Step(const StepPlan& plan) {
  if (!in_flight_.empty()) return Internal("Step while submitted steps are in flight");
  RETURN_IF_ERROR(Submit(plan));
  return Collect();
}

Status ClusterEngine::Submit(const StepPlan& plan) {
  if (!down_.ok()) return down_.WithContext("cluster is down");
  if (static_cast<int>(in_flight_.size()) >= std::max(1, pipeline_depth()))
    return Internal("more steps submitted than the pipeline depth");
  for (const auto& s : plan.sequences) {  // plans in flight never share a sequence
    const auto has = [&](const InFlight& f) { return f.grown.count(s.sequence_id) > 0; };
    if (std::any_of(in_flight_.begin(), in_flight_.end(), has))
      return Internal("sequence " + std::to_string(s.sequence_id) +
                      " is already in a step in flight");
  }
  RETURN_IF_ERROR(ValidateStep(config_, lengths_, plan));
  std::vector<KvAssign> assigns;
  RETURN_IF_ERROR(kv_->Plan(plan, &assigns));
  std::vector<StepPlan> parts = SplitForPipeline(plan);
  parts.front().released = std::move(released_);  // frees, blocks and copies go first
  parts.front().kv_assign = std::move(assigns);
  released_.clear();
  // Every part goes out before any answer is awaited: while the last stage works on part i, the
  // first stage already runs part i + 1 (ranks take their steps in order).
  for (const StepPlan& part : parts) {
    const std::vector<uint8_t> payload = rpc::EncodeStep(part);
    for (size_t r = 0; r < ranks_.size(); ++r) {
      const Status st = ranks_[r]->Send(rpc::MessageType::kStep, payload, opts_.timeouts.step);
      if (!st.ok()) return Fail(st.WithContext("step: rank " + std::to_string(r) + " lost"));
    }
  }
  InFlight f;
  f.kv_copies = plan.kv_copies;
  f.output_rows = plan.total_outputs();
  for (const auto& s : plan.sequences)
    f.grown[s.sequence_id] = static_cast<int64_t>(s.tokens.size());
  f.parts = parts.size();
  in_flight_.push_back(std::move(f));
  return OkStatus();
}

Result<StepOutput> ClusterEngine::Collect() {
  if (in_flight_.empty()) return Internal("Collect without a submitted step");
  const InFlight f = std::move(in_flight_.front());
  in_flight_.pop_front();
  // The last stage's tensor-parallel rank 0 carries the outputs; parts' rows follow plan order.
  // Logits rows may pass the frame size (150 rows of a 256000 vocabulary: 154 MB) and come in
  // pieces, up to what the plan asked for.
  const size_t carrier = static_cast<size_t>((opts_.pp - 1) * opts_.tp);
  const size_t width = static_cast<size_t>(std::max<int64_t>(config_.vocab_size, config_.num_labels));
  ranks_[carrier]->ExpectUpTo(static_cast<size_t>(f.output_rows) * (width + 1) * sizeof(float) + (1 << 20));
  StepOutput out;
  for (size_t i = 0; i < f.parts; ++i) {
    ASSIGN_OR_RETURN(auto answers, CollectAll(opts_.timeouts.step, "step"));
    ASSIGN_OR_RETURN(StepOutput part, rpc::DecodeStepOutput(answers[carrier].payload));
    for (size_t r = 0; r < answers.size(); ++r) {  // the slowest rank's time (others carry no rows)
      if (r == carrier) continue;
      ASSIGN_OR_RETURN(const StepOutput other, rpc::DecodeStepOutput(answers[r].payload));
      part.rank_us = std::max(part.rank_us, other.rank_us);
    }
    if (i == 0) {
      out = std::move(part);
      continue;
    }
    out.rank_us += part.rank_us;
    if (part.rows > 0) out.width = part.width;
    out.rows += part.rows;
    out.values.insert(out.values.end(), part.values.begin(), part.values.end());
    out.ids.insert(out.ids.end(), part.ids.begin(), part.ids.end());
  }
  StepPlan::ApplyCopies(f.kv_copies, lengths_);
  for (const auto& [id, n] : f.grown) lengths_[id] += n;
  return out;
}

}  // namespace gemma2
