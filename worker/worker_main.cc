// gemma2-worker: one tensor-parallel rank. Connects to the coordinator over the control plane,
// proves the cluster secret, loads only its shard, joins its group's collective, then runs every
// step plan it receives until told to stop or until the control channel is lost (then it exits:
// a worker never outlives its coordinator).
//
// Fault injection for tests (environment), on the rank named by GEMMA2_FAULT_RANK only:
// GEMMA2_FAULT_KILL_AFTER_STEPS=N kills it with SIGKILL when step N arrives;
// GEMMA2_FAULT_STOP_AFTER_STEPS=N stops it (SIGSTOP), a hang;
// GEMMA2_FAULT_KILL_BEFORE_JOIN=1 kills it before it reaches the coordinator.
#include <gloo/rendezvous/prefix_store.h>
#include <signal.h>
#include <sys/prctl.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <thread>

#include "collectives/gloo_collective.h"
#include "collectives/store_exchange.h"
#include "common/log.h"
#include "cpu/cpu_backend.h"
#include "model/checkpoint.h"
#include "engine/backend_factory.h"
#include "model/rank_model.h"
#include "rpc/bootstrap.h"
#include "rpc/timeouts.h"
#include "rpc/ucx_channel.h"
#include "cli/options.h"
#include "cli/run_tool.h"
#include "worker/control_plane_store.h"
#include "worker/step_thread.h"
#ifdef GEMMA2_HAVE_CUDA
#include "collectives/nccl_collective.h"
#endif

namespace gemma2 {
namespace {

#ifdef GEMMA2_HAVE_CUDA
using NcclLike = NcclCollective;
#else
struct NcclLike {  // without CUDA there are no GPU groups to watch
  void Arm(std::chrono::milliseconds) {}
  void Disarm() {}
};
#endif

using namespace std::chrono_literals;

// The control thread's longest sleep while it waits for a frame or a step's answer.
constexpr auto kIdleNap = 100ms;

struct Args {
  std::string coordinator, model, secret_file, backend = "cpu";
  std::string quantization = "auto";  // the projections' form (model/quantization.h)
  std::string kv_cache_dtype = "auto";  // the KV cache's (model/quantization.h)
  int device = 0;  // the GPU (cuda backend)
  // Silence from the coordinator after which this rank leaves: before its first word, the
  // startup timeout; after, the heartbeat timeout. Every other wait: rpc/timeouts.h.
  ClusterTimeouts timeouts;
  int rank = 0, tp = 1, pp = 1, threads = 1;  // rank: global, stage * tp + tensor-parallel rank
  int parent_pid = 0;                         // launched locally: the launcher's pid
  std::string address = "127.0.0.1";          // this node's address for the collectives
};

Result<std::vector<uint8_t>> ReadSecret(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return NotFound("cannot read the cluster secret file " + path);
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string s = ss.str();
  if (s.size() < 16)
    return InvalidArgument("cluster secret in " + path + " is shorter than 16 bytes");
  return std::vector<uint8_t>(s.begin(), s.end());
}

int64_t EnvInt(const char* name) {
  const char* v = std::getenv(name);
  return v ? std::atoll(v) : -1;
}

// The fused one-shot all-reduce where the group's GPUs share a host (cuda only), when every
// rank's GEMMA2_PEER_ALLREDUCE=1 (the ranks agree first, so all take the same path). Off by
// default: on two H200s it measured slower than NCCL plus AddRmsNorm (bench/results/
// 2026-11-29-27b-h200x2-tp2.txt). Where the ranks cannot map each other's memory, NCCL stays, with
// a line on stderr saying why.
Status ConnectPeers(Backend& backend, gloo::rendezvous::Store& store, const std::string& prefix,
                    int tp_rank, int tp, int64_t hidden, int global_rank) {
  const PeerExchange exchange = [&](const std::string& key, const std::string& mine) {
    return ExchangeThroughStore(store, prefix + "/" + key, tp_rank, tp, mine);
  };
  const char* env = std::getenv("GEMMA2_PEER_ALLREDUCE");
  const bool wanted = env != nullptr && std::string(env) == "1";
  ASSIGN_OR_RETURN(const std::vector<std::string> votes,
                   exchange("peer-wanted", wanted ? "1" : "0"));
  if (std::count(votes.begin(), votes.end(), "1") != tp) return OkStatus();
  const Status st = backend.ConnectPeers(tp_rank, tp, hidden, exchange);
  if (st.code() == StatusCode::kUnavailable) {
    log::Warn("all-reduce through NCCL only: " + st.message());
    return OkStatus();
  }
  return st;
}

// The control thread once the rank is ready: steps go to the step thread, their answers back in
// order; heartbeats are answered at once. Returns OK on shutdown; an error when the channel
// fails, a step fails, or the coordinator says nothing for --heartbeat-timeout (it sends a
// heartbeat every second between and during steps), so a rank never outlives a coordinator it can
// no longer hear (a crash, a partition).
Status ControlLoop(const Args& a, rpc::Channel& ch, rpc::UcxNode& node, StepThread& steps) {
  const bool faulty = EnvInt("GEMMA2_FAULT_RANK") == a.rank;
  const int64_t kill_after = faulty ? EnvInt("GEMMA2_FAULT_KILL_AFTER_STEPS") : -1;
  const int64_t stop_after = faulty ? EnvInt("GEMMA2_FAULT_STOP_AFTER_STEPS") : -1;
  using Clock = std::chrono::steady_clock;
  // Until the coordinator's first word the rest of the cluster may still be starting.
  auto silence_limit = a.timeouts.startup;
  auto last_heard = Clock::now();
  RETURN_IF_ERROR(ch.StartReceive().WithContext("control channel"));
  for (int64_t step = 0;;) {
    while (auto answer = steps.TakeDone()) {
      if (!answer->ok()) return answer->status();
      RETURN_IF_ERROR(ch.Send(rpc::MessageType::kStepResult, **answer, a.timeouts.step));
    }
    auto got = ch.Poll();
    if (!got.ok()) return got.status().WithContext("control channel");
    if (*got) {
      last_heard = Clock::now();
      silence_limit = a.timeouts.heartbeat;
      rpc::Received m = ch.Take();
      if (m.type == rpc::MessageType::kShutdown) return OkStatus();
      if (m.type == rpc::MessageType::kHeartbeat) {
        RETURN_IF_ERROR(ch.Send(rpc::MessageType::kHeartbeat, {}, a.timeouts.heartbeat));
      } else if (m.type == rpc::MessageType::kStep) {
        if (step == kill_after) raise(SIGKILL);
        if (step == stop_after) raise(SIGSTOP);
        ++step;
        steps.Push(std::move(m.payload));
      } else {
        return InvalidArgument("unexpected control message type " +
                               std::to_string(static_cast<int>(m.type)));
      }
      RETURN_IF_ERROR(ch.StartReceive().WithContext("control channel"));
      continue;
    }
    const auto silent = Clock::now() - last_heard;
    if (silent > silence_limit) {
      ch.Abandon("no word from the coordinator");  // nothing more is sent, closing does not wait
      return Status(StatusCode::kUnavailable,
                    "no word from the coordinator " + a.coordinator + " for " +
                        std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(silent).count()) +
                        " ms (crashed or unreachable): leaving");
    }
    // Sleeps until a frame or a step's answer arrives (a bounded nap, not a poll loop).
    node.WaitForEvents(kIdleNap, steps.ready_fd());
  }
}

// Everything after the handshake; failures go back to the coordinator before the worker exits.
Status Serve(const Args& a, rpc::Channel& ch, rpc::UcxNode& node) {
  ASSIGN_OR_RETURN(auto ck, OpenWeightSource(a.model));
  const int stage = a.rank / a.tp, tp_rank = a.rank % a.tp;
  ASSIGN_OR_RETURN(ShardPlan plan, ShardPlan::Make(ck->config(), a.tp, tp_rank, a.pp, stage));
  BackendOptions bo;
  bo.name = a.backend;
  bo.device = a.device;
  bo.max_positions = ck->config().max_position_embeddings;
  ASSIGN_OR_RETURN(auto backend, MakeBackend(bo));
  SetCpuMathThreads(a.threads);
  ASSIGN_OR_RETURN(const Quantization quantization, ResolveQuantization(a.quantization, a.model));
  ASSIGN_OR_RETURN(auto model, RankModel::Load(*ck, plan, *backend, {}, quantization));
  // Rendezvous through the coordinator (the control channel), whatever host each rank is on.
  ControlPlaneStore store(ch, a.timeouts.step);
  // GPU ranks talk over NCCL on the backend's stream (a lone GPU rank too: the same path, whose
  // sums are the identity); cpu ranks over Gloo.
  const bool gpu_group = a.backend == "cuda";
  std::vector<NcclLike*> watched;
  auto group = [&](int rank, int size,
                   const std::string& prefix) -> Result<std::unique_ptr<Collective>> {
    if (gpu_group) {
#ifdef GEMMA2_HAVE_CUDA
      NcclOptions no;
      no.rank = rank;
      no.size = size;
      no.device = a.device;
      no.stream = backend->native_stream();
      no.who = "rank " + std::to_string(a.rank) + " (" + prefix + ")";
      ASSIGN_OR_RETURN(auto c, NcclCollective::Create(no, store, prefix + "/nccl-id"));
      watched.push_back(c.get());
      return std::unique_ptr<Collective>(std::move(c));
#else
      return Unimplemented("this build has no CUDA");
#endif
    }
    GlooOptions o;
    o.hostname = a.address;
    o.rank = rank;
    o.size = size;
    o.timeout = a.timeouts.step;
    gloo::rendezvous::PrefixStore prefixed(prefix, store);
    ASSIGN_OR_RETURN(auto c, GlooCollective::Create(o, prefixed));
    return std::unique_ptr<Collective>(std::move(c));
  };
  ASSIGN_OR_RETURN(auto comm, group(tp_rank, a.tp, "tp-" + std::to_string(stage)));
  if (gpu_group && a.tp > 1) {
    RETURN_IF_ERROR(ConnectPeers(*backend, store, "tp-" + std::to_string(stage), tp_rank, a.tp,
                                 ck->config().hidden_size, a.rank));
  }
  // Links to the neighbouring stages (same tensor-parallel rank): the next link first, so the
  // chain of rendezvous resolves from the last stage back.
  std::unique_ptr<Collective> next, prev;
  if (stage + 1 < a.pp) {
    ASSIGN_OR_RETURN(next,
                     group(0, 2, "pp-" + std::to_string(stage) + "-" + std::to_string(tp_rank)));
  }
  if (stage > 0) {
    ASSIGN_OR_RETURN(
        prev, group(1, 2, "pp-" + std::to_string(stage - 1) + "-" + std::to_string(tp_rank)));
  }
  const PipelineLinks links{prev.get(), next.get()};
  const bool carries_output = stage == a.pp - 1 && tp_rank == 0;
  // The KV pool as the coordinator asks (its store's "kv-cache": block size and blocks, 0: what
  // memory allows); ready, with the blocks it got, so the coordinator never assigns past them.
  std::vector<uint8_t> spec;
  try {
    const std::vector<char> v = store.get("kv-cache");
    spec.assign(v.begin(), v.end());
  } catch (const std::exception& e) {
    return Status(StatusCode::kUnavailable, std::string("reading the KV cache spec: ") + e.what());
  }
  ASSIGN_OR_RETURN(const rpc::KvCapacity asked, rpc::DecodeKvCapacity(spec));
  int64_t blocks = asked.blocks;
  if (const int64_t t = EnvInt("GEMMA2_TEST_KV_BLOCKS"); t > 0) blocks = t;  // tests: a small pool
  ASSIGN_OR_RETURN(const KvCacheDtype kv_dtype, ParseKvCacheDtype(a.kv_cache_dtype));
  ASSIGN_OR_RETURN(blocks, model->CreateKvPool(asked.block_size, blocks, kv_dtype));
  KvBlockTables kv(KvLayout::For(ck->config(), asked.block_size), blocks);
  RETURN_IF_ERROR(ch.Send(rpc::MessageType::kHeartbeat,
                          rpc::EncodeKvCapacity({blocks, asked.block_size}), a.timeouts.control_send));

  // Steps run on their own thread (worker/step_thread.h); this thread keeps the control channel,
  // answering heartbeats at once even mid-step, and watches for a silent coordinator.
  StepThread steps([&](const std::vector<uint8_t>& payload) -> Result<std::vector<uint8_t>> {
    RETURN_IF_ERROR(backend->BindThread());  // cuda: this thread's device is the rank's GPU
    ASSIGN_OR_RETURN(StepPlan p, rpc::DecodeStep(payload));
    const auto began = std::chrono::steady_clock::now();
    for (int64_t id : p.released) kv.Release(id);
    RETURN_IF_ERROR(kv.Apply(p.kv_assign).WithContext("step plan"));
    for (const KvCopy& k : p.kv_copies) RETURN_IF_ERROR(model->CopyKv(kv, k));
    StepOutput out;
    // The step watchdog of GPU collectives: a peer that hangs aborts the communicators.
    for (auto* n : watched) n->Arm(a.timeouts.step);
    const Status ran = model->Forward(p, kv, *comm, &out, links);
    for (auto* n : watched) n->Disarm();
    RETURN_IF_ERROR(ran);
    // Every rank answers (so the coordinator hears from each); the last stage's rank 0 carries
    // the output.
    if (!carries_output) out = StepOutput{};
    out.rank_us = std::chrono::duration_cast<std::chrono::microseconds>(
                      std::chrono::steady_clock::now() - began)
                      .count();
    return rpc::EncodeStepOutput(out);
  });
  const Status st = ControlLoop(a, ch, node, steps);
  if (steps.busy()) {
    // The step thread still uses this frame's model and collectives (perhaps waiting on a peer
    // that is gone): leave at once, saying why (to the coordinator too, when it can still hear).
    if (!st.ok()) {
      if (!ch.broken()) (void)ch.Send(rpc::MessageType::kError, rpc::EncodeStatus(st), a.timeouts.goodbye_send);
      log::Error(st.ToString());
    }
    std::fflush(stderr);
    std::_Exit(st.ok() ? 0 : 1);
  }
  return st;
}

Status Run(const Args& a) {
  log::SetProgram("gemma2-worker[rank " + std::to_string(a.rank) + "]");
  // A peer that dies mid-collective must surface as an error from the write, not kill this
  // process with SIGPIPE.
  signal(SIGPIPE, SIG_IGN);
  if (a.parent_pid > 0) {
    // Launched locally: never outlive the launcher (also if it died before this line ran).
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != a.parent_pid) return Status(StatusCode::kUnavailable, "the launcher is gone");
  }
  const size_t colon = a.coordinator.rfind(':');
  if (colon == std::string::npos) return InvalidArgument("--coordinator must be HOST:PORT");
  const std::string host = a.coordinator.substr(0, colon);
  const int port = std::atoi(a.coordinator.c_str() + colon + 1);
  ASSIGN_OR_RETURN(auto secret, ReadSecret(a.secret_file));
  if (EnvInt("GEMMA2_FAULT_RANK") == a.rank && EnvInt("GEMMA2_FAULT_KILL_BEFORE_JOIN") == 1)
    raise(SIGKILL);
  ASSIGN_OR_RETURN(auto node, rpc::UcxNode::Create(a.address));
  // The bootstrap (rpc/bootstrap.h): prove the secret, check the coordinator's proof, swap UCX
  // addresses; retried while nobody listens yet or the coordinator is busy.
  std::vector<uint8_t> coordinator_address;
  for (const auto deadline = std::chrono::steady_clock::now() + a.timeouts.connect;;) {
    auto joined = rpc::JoinCluster(host, port, static_cast<uint32_t>(a.rank), secret,
                                   node->address(), a.timeouts.control_send);
    if (joined.ok()) {
      coordinator_address = std::move(joined).value();
      break;
    }
    const bool transient = joined.status().code() == StatusCode::kUnavailable ||
                           joined.status().code() == StatusCode::kDeadlineExceeded;
    if (!transient || std::chrono::steady_clock::now() > deadline) {
      return joined.status().WithContext("rank " + std::to_string(a.rank) + " joining the cluster at " +
                                         a.coordinator);
    }
    std::this_thread::sleep_for(a.timeouts.connect_retry);
  }
  ASSIGN_OR_RETURN(auto ch, node->ConnectTo(coordinator_address, "coordinator " + a.coordinator));
  const Status st = Serve(a, *ch, *node);
  if (!st.ok() && !ch->broken())
    (void)ch->Send(rpc::MessageType::kError, rpc::EncodeStatus(st), a.timeouts.control_send);
  return st.WithContext("rank " + std::to_string(a.rank));
}

}  // namespace
}  // namespace gemma2

int main(int argc, char** argv) {
  gemma2::Args a;
  CLI::App app{"gemma2-worker: one tensor-parallel rank of a gemma2 cluster"};
  app.add_option("--coordinator", a.coordinator, "control plane address HOST:PORT")->required();
  app.add_option("--rank", a.rank, "this rank")->required();
  gemma2::cli::AddTp(app, a.tp, "in this rank's group")->required();
  gemma2::cli::AddPp(app, a.pp);
  gemma2::cli::AddModel(app, a.model)->required();
  app.add_option("--secret-file", a.secret_file, "file holding the cluster secret")->required();
  gemma2::cli::AddBackend(app, a.backend);
  app.add_option("--threads", a.threads, "math threads");
  app.add_option("--parent-pid", a.parent_pid, "exit with this process (local launch)");
  app.add_option("--address", a.address, "address this node's collectives bind to");
  app.add_option("--device", a.device, "GPU index on this node (cuda backend)");
  gemma2::cli::AddQuantization(app, a.quantization);
  gemma2::cli::AddKvCacheDtype(app, a.kv_cache_dtype);
  gemma2::cli::AddClusterTimeouts(app, a.timeouts, /*connect=*/true);
  return gemma2::RunTool("gemma2-worker", app, argc, argv, [&] { return gemma2::Run(a); });
}
