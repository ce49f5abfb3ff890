#include "coordinator/cluster.h"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "model/checkpoint.h"
#include "model/sharding.h"
#include "rpc/auth.h"

namespace gemma2 {
namespace {

using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

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

Result<std::unique_ptr<ClusterEngine>> ClusterEngine::LaunchLocal(const ClusterOptions& opts) {
  std::unique_ptr<ClusterEngine> c(new ClusterEngine());
  RETURN_IF_ERROR(c->Start(opts));  // on failure the destructor stops what was started
  return c;
}

Status ClusterEngine::Start(const ClusterOptions& opts) {
  opts_ = opts;
  ASSIGN_OR_RETURN(auto ck, Checkpoint::Open(opts.model));
  config_ = ck->config();
  const int world = opts.tp * opts.pp;
  for (int r = 0; r < world; ++r) {
    RETURN_IF_ERROR(ShardPlan::Make(config_, opts.tp, r % opts.tp, opts.pp, r / opts.tp).status());
  }
  // A private directory: the secret (0600) and the collective's rendezvous.
  char tmpl[] = "/tmp/gemma2-cluster-XXXXXX";
  if (!mkdtemp(tmpl)) return Internal("cannot create a working directory in /tmp");
  work_dir_ = tmpl;
  ASSIGN_OR_RETURN(rpc::Nonce secret, rpc::FreshNonce());
  const std::string secret_file = work_dir_ + "/secret", wrong_file = work_dir_ + "/wrong-secret";
  for (const auto& [file, value] :
       {std::pair{secret_file, HexOf(secret)}, std::pair{wrong_file, std::string(64, 'x')}}) {
    std::ofstream(file) << value;
    std::filesystem::permissions(
        file, std::filesystem::perms::owner_read | std::filesystem::perms::owner_write);
  }
  const std::string gloo_dir = work_dir_ + "/gloo";
  std::filesystem::create_directories(gloo_dir);

  ASSIGN_OR_RETURN(node_, rpc::UcxNode::Create());
  ASSIGN_OR_RETURN(int port, node_->Listen(opts.listen_host, 0));
  std::string worker = opts.worker_binary;
  if (worker.empty()) {
    worker =
        (std::filesystem::read_symlink("/proc/self/exe").parent_path() / "gemma2-worker").string();
  }
  for (int r = 0; r < world; ++r) {
    const std::string rank = std::to_string(r), tp = std::to_string(opts.tp),
                      pp = std::to_string(opts.pp);
    const std::string coord = opts.listen_host + ":" + std::to_string(port);
    const std::string threads = std::to_string(opts.threads_per_worker);
    const std::string parent = std::to_string(getpid());
    const std::string& secret_arg = r == opts.wrong_secret_rank ? wrong_file : secret_file;
    const ClusterOptions::Node node =
        opts.nodes.empty() ? ClusterOptions::Node{}
                           : opts.nodes[static_cast<size_t>(
                                 r / ((world + static_cast<int>(opts.nodes.size()) - 1) /
                                      static_cast<int>(opts.nodes.size())))];
    std::vector<std::string> argv_s = node.exec_prefix;
    for (const std::string& arg :
         {worker,       std::string("--coordinator"), coord,       std::string("--rank"),
          rank,         std::string("--tp"),          tp,          std::string("--pp"),
          pp,           std::string("--model"),       opts.model,  std::string("--secret-file"),
          secret_arg,   std::string("--gloo-dir"),    gloo_dir,    std::string("--backend"),
          opts.backend, std::string("--threads"),     threads,     std::string("--parent-pid"),
          parent,       std::string("--address"),     node.address}) {
      argv_s.push_back(arg);
    }
    const pid_t pid = fork();
    if (pid < 0) return Internal("fork failed while starting rank " + rank);
    if (pid == 0) {
      std::vector<char*> argv;
      for (auto& a : argv_s) argv.push_back(a.data());
      argv.push_back(nullptr);
      execvp(argv[0], argv.data());
      _exit(127);
    }
    pids_.push_back(pid);
  }
  // Handshakes: every connection gets a fresh nonce and must answer with its rank's MAC.
  const std::string secret_text = HexOf(secret);
  const std::vector<uint8_t> secret_bytes(secret_text.begin(), secret_text.end());
  ranks_.resize(static_cast<size_t>(world));
  const auto deadline = Clock::now() + opts.startup_timeout;
  for (int accepted = 0; accepted < world; ++accepted) {
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    auto ch = node_->Accept(std::max(left, 1ms));
    if (!ch.ok()) {
      return Fail(ch.status().WithContext("startup: " + std::to_string(world - accepted) +
                                          " rank(s) never connected"));
    }
    ASSIGN_OR_RETURN(rpc::Nonce nonce, rpc::FreshNonce());
    RETURN_IF_ERROR(Fail((*ch)->Send(rpc::MessageType::kHello, nonce, 10s)));
    auto auth = (*ch)->Receive(30s);
    if (!auth.ok()) return Fail(auth.status().WithContext("startup handshake"));
    rpc::Reader rd(auth->payload);
    uint32_t rank = 0;
    const bool shaped = auth->type == rpc::MessageType::kAuth && rd.U32(&rank).ok() &&
                        auth->payload.size() == 4 + sizeof(rpc::Mac) &&
                        rank < static_cast<uint32_t>(world);
    if (!shaped ||
        !rpc::VerifyAuth(secret_bytes, nonce, rank, {auth->payload.data() + 4, sizeof(rpc::Mac)})) {
      const Status refused(StatusCode::kUnavailable, "wrong or missing cluster secret");
      (void)(*ch)->Send(rpc::MessageType::kError, rpc::EncodeStatus(refused), 5s);
      return Fail(refused.WithContext("startup: connection from " + (*ch)->peer() +
                                      " claiming rank " + std::to_string(rank) + " refused"));
    }
    if (ranks_[rank])
      return Fail(InvalidArgument("startup: rank " + std::to_string(rank) + " connected twice"));
    RETURN_IF_ERROR(Fail((*ch)->Send(rpc::MessageType::kAuthOk, {}, 10s)));
    ranks_[rank] = std::move(ch).value();
  }
  // Each rank loads its shard and joins the collective, then reports ready (or why not).
  auto ready = CollectAll(opts.startup_timeout, "startup");
  if (!ready.ok()) return ready.status();
  for (int r = 0; r < world; ++r) {
    if ((*ready)[static_cast<size_t>(r)].type != rpc::MessageType::kHeartbeat) {
      return Fail(Internal("startup: rank " + std::to_string(r) + " sent an unexpected message"));
    }
  }
  return OkStatus();
}

Status ClusterEngine::Fail(Status st) {
  if (!st.ok() && down_.ok()) down_ = st;
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
  while (remaining > 0) {
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
      if (got[r].type == rpc::MessageType::kHeartbeat && what != std::string("startup")) {
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
        const auto grace = Clock::now() + 2s;
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

ClusterEngine::~ClusterEngine() {
  for (auto& ch : ranks_) {
    if (ch && !ch->broken()) (void)ch->Send(rpc::MessageType::kShutdown, {}, 2s);
  }
  // Give workers a moment to exit on their own, then make sure.
  const auto deadline = Clock::now() + 3s;
  for (pid_t pid : pids_) {
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
  if (!work_dir_.empty()) {
    std::error_code ec;
    std::filesystem::remove_all(work_dir_, ec);
  }
}

Status ClusterEngine::Watch(std::chrono::milliseconds duration, const volatile bool* stop) {
  if (!down_.ok()) return down_;
  for (size_t r = 0; r < ranks_.size(); ++r) {
    const Status st = ranks_[r]->StartReceive();
    if (!st.ok()) return Fail(st.WithContext("rank " + std::to_string(r) + " lost"));
  }
  heartbeat_sent_.resize(ranks_.size());
  const auto deadline = Clock::now() + duration;
  while (Clock::now() < deadline && !(stop && *stop)) {
    const auto now = Clock::now();
    const bool round = now - last_heartbeat_round_ >= opts_.heartbeat_interval;
    if (round) last_heartbeat_round_ = now;
    for (size_t r = 0; r < ranks_.size(); ++r) {
      if (round && !heartbeat_sent_[r]) {
        const Status st =
            ranks_[r]->Send(rpc::MessageType::kHeartbeat, {}, opts_.heartbeat_timeout);
        if (!st.ok()) return Fail(st.WithContext("rank " + std::to_string(r) + " lost"));
        heartbeat_sent_[r] = now;
      }
      if (heartbeat_sent_[r] && now - *heartbeat_sent_[r] > opts_.heartbeat_timeout) {
        return Fail(Status(StatusCode::kDeadlineExceeded,
                           "rank " + std::to_string(r) + " has not answered a heartbeat for " +
                               std::to_string(opts_.heartbeat_timeout.count()) + " ms (hung?)"));
      }
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
    node_->WaitForEvents(std::chrono::milliseconds(2));
  }
  return OkStatus();
}

int64_t ClusterEngine::NewSequence() {
  const int64_t id = next_id_++;
  lengths_[id] = 0;
  return id;
}

void ClusterEngine::ReleaseSequence(int64_t id) {
  if (lengths_.erase(id)) released_.push_back(id);  // the ranks free it with the next step
}

int64_t ClusterEngine::SequenceLength(int64_t id) const {
  auto it = lengths_.find(id);
  return it == lengths_.end() ? -1 : it->second;
}

Result<StepOutput> ClusterEngine::Step(const StepPlan& plan) {
  if (!down_.ok()) return down_.WithContext("cluster is down");
  RETURN_IF_ERROR(ValidateStep(config_, lengths_, plan));
  StepPlan sent = plan;
  sent.released = std::move(released_);
  released_.clear();
  const std::vector<uint8_t> payload = rpc::EncodeStep(sent);
  for (size_t r = 0; r < ranks_.size(); ++r) {
    const Status st = ranks_[r]->Send(rpc::MessageType::kStep, payload, opts_.step_timeout);
    if (!st.ok()) return Fail(st.WithContext("step: rank " + std::to_string(r) + " lost"));
  }
  ASSIGN_OR_RETURN(auto answers, CollectAll(opts_.step_timeout, "step"));
  // The last stage's tensor-parallel rank 0 carries the outputs.
  const size_t carrier = static_cast<size_t>((opts_.pp - 1) * opts_.tp);
  ASSIGN_OR_RETURN(StepOutput out, rpc::DecodeStepOutput(answers[carrier].payload));
  StepPlan::ApplyCopies(plan.kv_copies, lengths_);
  for (const auto& s : plan.sequences)
    lengths_[s.sequence_id] += static_cast<int64_t>(s.tokens.size());
  return out;
}

}  // namespace gemma2
