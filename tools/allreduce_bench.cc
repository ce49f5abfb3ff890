// gemma2-allreduce-bench: NCCL all-reduce latency between GPU processes of this host, eagerly and
// replayed inside a CUDA graph, for the messages tensor parallelism sends after each o_proj and
// down_proj: tokens x hidden bf16 (default 1 .. 2048 tokens x 4608: 9 KB .. 19 MB). One process
// per GPU, forked before CUDA starts, meeting through a file store; the communicator (with its
// watchdog) is the one the workers use (collectives/nccl_collective.h). Rank 0 prints a table
// (microseconds per all-reduce, bus bandwidth) and writes JSON.
//
//   gemma2-allreduce-bench --gpus 8 [--hidden 4608] [--tokens 1,2,4,...] [--iters 50] [--out F]
#include <cuda_runtime.h>
#include <gloo/rendezvous/file_store.h>
#include <sys/wait.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <vector>

#include "collectives/nccl_collective.h"
#include "common/cuda_check.h"
#include "cli/run_tool.h"

namespace gemma2 {
namespace {

struct Args {
  int gpus = 2;
  int64_t hidden = 4608;
  std::vector<int64_t> tokens = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048};
  int iters = 50;
  std::string out;
};

// Milliseconds of `iters` all-reduces of `t`, issued eagerly (graph == false) or captured once
// into a graph and replayed.
Result<double> Time(NcclCollective& comm, Tensor& t, int iters, bool graph, cudaStream_t stream) {
  // Every handle is released on every path (RAII), errors included.
  using Event = std::unique_ptr<CUevent_st, decltype(&cudaEventDestroy)>;
  using Exec = std::unique_ptr<CUgraphExec_st, decltype(&cudaGraphExecDestroy)>;
  cudaEvent_t raw_start = nullptr, raw_stop = nullptr;
  RETURN_IF_CUDA_ERROR(cudaEventCreate(&raw_start));
  Event start_owner(raw_start, &cudaEventDestroy);
  RETURN_IF_CUDA_ERROR(cudaEventCreate(&raw_stop));
  Event stop_owner(raw_stop, &cudaEventDestroy);
  cudaEvent_t start = raw_start, stop = raw_stop;
  Exec exec_owner(nullptr, &cudaGraphExecDestroy);
  cudaGraphExec_t exec = nullptr;
  if (graph) {
    cudaGraph_t g = nullptr;
    RETURN_IF_CUDA_ERROR(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    Status captured;
    for (int i = 0; i < iters && captured.ok(); ++i) captured = comm.AllReduceSum(t);
    RETURN_IF_CUDA_ERROR(cudaStreamEndCapture(stream, &g));
    std::unique_ptr<CUgraph_st, decltype(&cudaGraphDestroy)> g_owner(g, &cudaGraphDestroy);
    RETURN_IF_ERROR(captured);
    RETURN_IF_CUDA_ERROR(cudaGraphInstantiate(&exec, g, 0));
    exec_owner.reset(exec);
    RETURN_IF_CUDA_ERROR(cudaGraphLaunch(exec, stream));  // warm
  } else {
    for (int i = 0; i < 5; ++i) RETURN_IF_ERROR(comm.AllReduceSum(t));  // warm
  }
  RETURN_IF_CUDA_ERROR(cudaEventRecord(start, stream));
  if (graph) {
    RETURN_IF_CUDA_ERROR(cudaGraphLaunch(exec, stream));
  } else {
    for (int i = 0; i < iters; ++i) RETURN_IF_ERROR(comm.AllReduceSum(t));
  }
  RETURN_IF_CUDA_ERROR(cudaEventRecord(stop, stream));
  RETURN_IF_CUDA_ERROR(cudaEventSynchronize(stop));
  float ms = 0;
  RETURN_IF_CUDA_ERROR(cudaEventElapsedTime(&ms, start, stop));
  return static_cast<double>(ms);
}

// One rank's whole run in its own process.
Status RunRank(const Args& a, int rank, const std::string& dir) {
  RETURN_IF_CUDA_ERROR(cudaSetDevice(rank));
  cudaStream_t stream;
  RETURN_IF_CUDA_ERROR(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  gloo::rendezvous::FileStore store(dir);
  NcclOptions o;
  o.rank = rank;
  o.size = a.gpus;
  o.device = rank;
  o.stream = stream;
  o.who = "rank " + std::to_string(rank);
  ASSIGN_OR_RETURN(auto comm, NcclCollective::Create(o, store, "allreduce-bench"));
  int64_t most = 0;
  for (int64_t t : a.tokens) most = std::max(most, t);
  void* buf = nullptr;
  RETURN_IF_CUDA_ERROR(cudaMalloc(&buf, static_cast<size_t>(most * a.hidden) * 2));
  RETURN_IF_CUDA_ERROR(cudaMemset(buf, 0, static_cast<size_t>(most * a.hidden) * 2));
  nlohmann::json rows = nlohmann::json::array();
  if (rank == 0) {
    std::printf("%8s %10s %12s %12s %12s %12s\n", "tokens", "bytes", "eager us", "graph us",
                "eager GB/s", "graph GB/s");
  }
  for (int64_t tokens : a.tokens) {
    Tensor t;
    t.data = buf;
    t.rows = tokens;
    t.cols = a.hidden;
    t.dtype = DType::kBF16;
    comm->Arm(std::chrono::seconds(120));  // a peer that hangs ends in an abort, not here forever
    ASSIGN_OR_RETURN(const double eager_ms, Time(*comm, t, a.iters, false, stream));
    ASSIGN_OR_RETURN(const double graph_ms, Time(*comm, t, a.iters, true, stream));
    comm->Disarm();
    const double bytes = static_cast<double>(tokens * a.hidden * 2);
    // Bus bandwidth as nccl-tests reports it: what each link carries, 2 (n - 1) / n of the data.
    const double bus = bytes * 2.0 * (a.gpus - 1) / a.gpus;
    const double eager_us = eager_ms * 1e3 / a.iters, graph_us = graph_ms * 1e3 / a.iters;
    rows.push_back({{"tokens", tokens},
                    {"bytes", bytes},
                    {"eager_us", eager_us},
                    {"graph_us", graph_us},
                    {"eager_bus_gb_per_s", bus / eager_us / 1e3},
                    {"graph_bus_gb_per_s", bus / graph_us / 1e3}});
    if (rank == 0) {
      std::printf("%8lld %10.0f %12.2f %12.2f %12.1f %12.1f\n", static_cast<long long>(tokens),
                  bytes, eager_us, graph_us, bus / eager_us / 1e3, bus / graph_us / 1e3);
      std::fflush(stdout);
    }
  }
  if (rank == 0 && !a.out.empty()) {
    nlohmann::json doc{{"gpus", a.gpus},
                       {"hidden", a.hidden},
                       {"iters", a.iters},
                       {"dtype", "bf16"},
                       {"results", rows}};
    std::ofstream(a.out) << doc.dump(2) << "\n";
  }
  cudaFree(buf);
  cudaStreamDestroy(stream);
  return OkStatus();
}

Status Run(const Args& a) {
  const std::string dir =
      (std::filesystem::temp_directory_path() / ("gemma2-allreduce-" + std::to_string(getpid())))
          .string();
  std::filesystem::create_directories(dir);
  std::vector<pid_t> pids;
  for (int r = 0; r < a.gpus; ++r) {
    const pid_t pid = fork();
    if (pid < 0) return Internal("fork failed");
    if (pid == 0) {
      const Status st = RunRank(a, r, dir);
      if (!st.ok())
        std::fprintf(stderr, "gemma2-allreduce-bench: rank %d: %s\n", r, st.message().c_str());
      _exit(st.ok() ? 0 : 1);
    }
    pids.push_back(pid);
  }
  int failed = 0;
  for (pid_t p : pids) {
    int status = 0;
    waitpid(p, &status, 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) ++failed;
  }
  std::filesystem::remove_all(dir);
  if (failed)
    return Internal(std::to_string(failed) + " of " + std::to_string(a.gpus) + " ranks failed");
  return OkStatus();
}

}  // namespace
}  // namespace gemma2

int main(int argc, char** argv) {
  gemma2::Args a;
  CLI::App app{"gemma2-allreduce-bench: NCCL all-reduce latency, eager and in CUDA graphs"};
  app.add_option("--gpus", a.gpus, "processes, one per GPU (0 .. N-1)")->check(CLI::Range(1, 64));
  app.add_option("--hidden", a.hidden, "elements per token (27B: 4608)")
      ->check(CLI::Range(1, 1 << 20));
  app.add_option("--tokens", a.tokens, "message sizes in tokens")->delimiter(',');
  app.add_option("--iters", a.iters, "all-reduces per timing")->check(CLI::Range(1, 100000));
  app.add_option("--out", a.out, "write the results as JSON here");
  return gemma2::RunTool("gemma2-allreduce-bench", app, argc, argv, [&] { return gemma2::Run(a); });
}
