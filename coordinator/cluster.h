// The coordinator's view of a cluster: it starts one gemma2-worker process per rank of its own
// node (the other nodes' ranks come from their launchers or a job scheduler and join at its
// control port), authenticates each over the control plane, and runs every step by sending the
// same plan to all ranks and collecting their answers. It owns the sequences; it never touches
// weights.
//
// Threads: a ClusterEngine holds no lock and shares nothing; one thread (the scheduler's) makes
// every call but Wake(), which any thread may make (it writes an eventfd).
//
// Startup is all or nothing: a rank that fails (bad shard, wrong secret, crash) ends the launch
// with its rank and reason and every other process stopped. A rank lost later fails the step in
// flight with its rank, and every later step at once.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "model/step_executor.h"
#include "rpc/timeouts.h"
#include "rpc/ucx_channel.h"

namespace gemma2 {

// How one gemma2-worker process is started: by the coordinator for the ranks of its own node, or
// by a node's launcher (gemma2-launch --node-rank R) for that node's ranks.
struct WorkerSpawn {
  std::string worker_binary;  // default: gemma2-worker beside this program
  std::string coordinator;    // HOST:PORT of the control plane
  std::string model, backend = "cpu", secret_file, address = "127.0.0.1";
  std::string quantization = "auto";  // the worker's --quantization
  std::string kv_cache_dtype = "auto";  // the worker's --kv-cache-dtype
  int tp = 1, pp = 1, threads = 1;
  int device = 0;                        // the GPU of this rank on its node (cuda backend)
  std::vector<std::string> exec_prefix;  // e.g. {"ip", "netns", "exec", "ns1"}
  bool tie_to_parent = true;             // the worker dies with this process (--parent-pid)
  // Passed on as the worker's --startup-timeout, --step-timeout and --heartbeat-timeout.
  ClusterTimeouts timeouts;
};
Result<pid_t> SpawnWorker(const WorkerSpawn& w, int rank);
// Forks and runs argv (argv[0] found through PATH); a child that cannot exec exits 127. The child
// holds no descriptor of this process but 0-2; with `stderr_pipe`, its stderr is a pipe whose
// reading end (close-on-exec) is put there.
Result<pid_t> SpawnProcess(std::vector<std::string> argv, const std::string& what,
                           int* stderr_pipe = nullptr);

struct ClusterOptions {
  std::string model;  // checkpoint directory every worker reads its shard from
  int tp = 1;
  int pp = 1;  // pipeline stages; tp * pp worker processes
  // Decode steps kept in flight at once over disjoint sequences (0: pp; 1: none), so the stages
  // work on different steps at the same time.
  int pipeline_depth = 0;
  // A step's sequences go through the pipeline in this many micro-batches (0: pp), so stages
  // work at the same time instead of in turn — when the step has at least
  // `micro_batch_min_tokens` tokens: splitting pays when a stage's time grows with its tokens
  // (prefill); a memory-bound decode step takes about as long for half the batch.
  int micro_batches = 0;
  int64_t micro_batch_min_tokens = 256;
  std::string backend = "cpu";
  std::string quantization = "auto";  // the workers' --quantization (none or fp8)
  std::string kv_cache_dtype = "auto";  // the workers' --kv-cache-dtype
  int gpus_per_node = 0;  // cuda: one GPU per rank, numbered from 0 on each node (0: detect)
  int threads_per_worker = 1;
  // Every rank's KV pool: positions per block, and blocks (0: what each rank's memory allows;
  // the coordinator then assigns below the smallest).
  int64_t kv_block_size = 16;
  int64_t kv_blocks = 0;
  std::string worker_binary;  // gemma2-worker; default: beside /proc/self/exe
  // Startup, the step watchdog, and between steps (Watch) a heartbeat asked of each rank every
  // interval and answered within the timeout, so a hung rank is found even when no step runs.
  ClusterTimeouts timeouts;
  // Tests: give this rank another secret (its handshake must be refused).
  int wrong_secret_rank = -1;
  // Where the coordinator listens for workers (the control plane); port 0: any.
  std::string listen_host = "127.0.0.1";
  int control_port = 0;
  // Multi-host: the cluster secret every node holds (empty: a fresh one, local ranks only), and
  // the ranks this process starts itself, [spawn_begin, spawn_end) (-1: all); the others are
  // started by their nodes' launchers and connect to listen_host:control_port.
  std::string secret_file;
  int spawn_begin = 0, spawn_end = -1;
  // Nodes of this machine's test topology (network namespaces): ranks are split over them in
  // equal consecutive blocks; each node starts its workers through `exec_prefix` (e.g.
  // {"ip", "netns", "exec", "ns1"}) and they bind their collectives to `address`.
  struct Node {
    std::vector<std::string> exec_prefix;
    std::string address = "127.0.0.1";
  };
  std::vector<Node> nodes;  // empty: one node, loopback
  // Processes the caller started that must outlive the startup (e.g. the ssh sessions of the
  // other nodes), with a name for errors: one that exits ends the startup at once.
  std::vector<std::pair<pid_t, std::string>> watched;
};

class ClusterEngine final : public StepExecutor {
 public:
  static Result<std::unique_ptr<ClusterEngine>> LaunchLocal(const ClusterOptions& opts);
  // Stops every worker (shutdown, then SIGKILL after a grace period) and removes its files.
  ~ClusterEngine() override;

  const ModelConfig& config() const override { return config_; }
  int64_t NewSequence() override;
  void ReleaseSequence(int64_t id) override;
  int64_t SequenceLength(int64_t id) const override;
  const KvLayout& kv_layout() const override { return kv_->layout(); }
  int64_t kv_blocks() const override { return kv_->num_blocks(); }
  int64_t KvCopyFloor(int64_t id) const override { return kv_->CopyFloor(id); }
  Result<StepOutput> Step(const StepPlan& plan) override;
  Status health() const override { return down_; }
  int pipeline_depth() const override;
  Status Submit(const StepPlan& plan) override;
  Result<StepOutput> Collect() override;
  // Between steps: watches every rank for `duration`; an error names a rank that was lost or sent
  // something unasked. Returns early (OK) if `stop` becomes true.
  Status Watch(std::chrono::milliseconds duration, const std::atomic<bool>* stop = nullptr);
  // Ends a Watch early (from any thread): new work arrived.
  void Wake();
  int world() const { return static_cast<int>(ranks_.size()); }

 private:
  ClusterEngine() = default;
  Status Start(const ClusterOptions& opts);
  // Waits for one frame from every rank (polling all channels) or the first failure.
  Result<std::vector<rpc::Received>> CollectAll(std::chrono::milliseconds timeout,
                                                const char* what);
  Status Fail(Status st);
  // The fresh secret's directory (mkdtemp, /tmp/gemma2-cluster-PID-*): gone once every rank
  // joined, or with the engine.
  void RemoveWorkDir();
  // Sends each rank its heartbeat when due (every interval); an error names a rank whose answers
  // are being read (not `answered[r]`: a rank whose step answer is in is read later) that left
  // one unanswered for heartbeat_timeout. Called every poll round: allocates nothing.
  Status Heartbeats(const std::vector<bool>& answered, const char* what);
  // An error naming the first worker this process started that has exited (and reaps it).
  Status CheckChildren(const char* what);
  std::vector<StepPlan> SplitForPipeline(const StepPlan& plan) const;
  // A submitted plan awaiting its answers: what Collect applies to the lengths, and how many
  // micro-batches answer.
  struct InFlight {
    std::vector<KvCopy> kv_copies;
    std::map<int64_t, int64_t> grown;  // sequence id -> new tokens
    size_t parts = 1;
    int64_t output_rows = 0;  // rows the answers carry (bounds their size)
  };
  std::deque<InFlight> in_flight_;
  // A rendezvous request (kStoreSet / kStoreGet) from `rank`.
  Status ServeStore(size_t rank, const rpc::Received& m);

  ClusterOptions opts_;
  ModelConfig config_;
  std::string work_dir_;
  std::unique_ptr<rpc::UcxNode> node_;
  std::vector<std::unique_ptr<rpc::Channel>> ranks_;  // index = rank
  std::vector<pid_t> pids_;      // workers this process started (-1 once reaped)
  std::vector<std::string> pid_names_;  // "rank R", for errors
  std::vector<int> pid_ranks_;
  std::map<int64_t, int64_t> lengths_;
  // The collectives' rendezvous store and the ranks waiting for a key.
  std::map<std::string, std::vector<uint8_t>> store_;
  std::map<std::string, std::vector<size_t>> store_waiters_;
  std::vector<int64_t> released_;
  int64_t next_id_ = 1;
  Status down_;  // set once a rank is lost: the cluster runs nothing more
  // The block tables of every rank's KV cache, over the smallest rank's pool: the coordinator
  // assigns, the ranks apply (StepPlan::kv_assign).
  std::unique_ptr<KvBlockTables> kv_;
  // Heartbeats asked for and not yet answered, by rank (the oldest's send time; none: nullopt),
  // and when each rank was last sent one.
  std::vector<std::optional<std::chrono::steady_clock::time_point>> heartbeat_sent_;
  std::vector<std::chrono::steady_clock::time_point> heartbeat_last_;
  int wake_fd_ = -1;  // an eventfd: Wake() ends Watch's sleep
};

}  // namespace gemma2
