// gemma2-launch: starts and wires a cluster — a coordinator (this process) and one gemma2-worker
// per rank — checks it end to end with a one-token generation through every rank, reports ready,
// and keeps watching it. Startup is all or nothing. SIGTERM or SIGINT stops every process and
// exits 0; a lost rank stops the rest and exits 1 naming the rank.
//
//   gemma2-launch --model DIR --tp 4 --nodes 2   # tp 4 inside each node, 2 pipeline stages
//
// This machine only for now: nodes are pipeline stages of local processes (--node-exec/--listen of
// gemma2-run describe namespaced test nodes). Serving requests comes with the HTTP API.
#include <signal.h>

#include <CLI/CLI.hpp>
#include <cstdio>

#include "coordinator/cluster.h"
#include "model/generate.h"
#include "tools/cli_main.h"

namespace gemma2 {
namespace {

volatile bool g_stop = false;
void OnSignal(int) { g_stop = true; }

struct Args {
  std::string model, backend = "cpu";
  int tp = 1, nodes = 1, pp = 0;
  int64_t step_timeout_s = 60, startup_timeout_s = 120;
  double heartbeat_timeout_s = 10;
};

Status Run(const Args& a) {
  if (a.pp > 0 && a.nodes > 1 && a.pp != a.nodes) {
    return InvalidArgument("--pp and --nodes disagree (each node is one pipeline stage here)");
  }
  struct sigaction sa {};
  sa.sa_handler = OnSignal;
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGINT, &sa, nullptr);
  ClusterOptions co;
  co.model = a.model;
  co.tp = a.tp;
  co.pp = a.pp > 0 ? a.pp : a.nodes;
  co.backend = a.backend;
  co.step_timeout = std::chrono::seconds(a.step_timeout_s);
  co.startup_timeout = std::chrono::seconds(a.startup_timeout_s);
  co.heartbeat_timeout = std::chrono::milliseconds(static_cast<int64_t>(a.heartbeat_timeout_s * 1000));
  ASSIGN_OR_RETURN(auto cluster, ClusterEngine::LaunchLocal(co));
  // Ready means a real token went through every rank.
  GenerationRequest probe;
  probe.prompt = {static_cast<int32_t>(cluster->config().bos_token_id)};
  probe.max_new_tokens = 1;
  if (!cluster->config().is_classifier()) {
    ASSIGN_OR_RETURN(auto r, Generate(*cluster, {probe}));
    (void)r;
  } else {
    ASSIGN_OR_RETURN(auto r, Classify(*cluster, probe.prompt));
    (void)r;
  }
  std::printf("gemma2-launch: ready: %d ranks (tp %d x pp %d), model %s\n", cluster->world(), co.tp, co.pp,
              a.model.c_str());
  std::fflush(stdout);
  while (!g_stop) RETURN_IF_ERROR(cluster->Watch(std::chrono::seconds(1), &g_stop));
  std::printf("gemma2-launch: stopping on signal\n");
  std::fflush(stdout);
  return OkStatus();  // the cluster's destructor stops every worker
}

}  // namespace
}  // namespace gemma2

int main(int argc, char** argv) {
  gemma2::Args a;
  CLI::App app{"gemma2-launch: start a gemma2 cluster (coordinator + one worker per rank)"};
  app.add_option("--model", a.model, "Hugging Face checkpoint directory")->required();
  app.add_option("--tp", a.tp, "tensor-parallel ranks per node")->check(CLI::Range(1, 1024));
  app.add_option("--nodes", a.nodes, "nodes (pipeline stages across nodes)")->check(CLI::Range(1, 1024));
  app.add_option("--pp", a.pp, "pipeline stages (default: --nodes)")->check(CLI::Range(0, 1024));
  app.add_option("--backend", a.backend, "cpu (cuda workers come with the multi-GPU issue)");
  app.add_option("--step-timeout", a.step_timeout_s, "seconds before a step counts as hung");
  app.add_option("--startup-timeout", a.startup_timeout_s, "seconds for every rank to be ready");
  app.add_option("--heartbeat-timeout", a.heartbeat_timeout_s, "seconds an idle rank may take to answer a heartbeat");
  return gemma2::RunTool("gemma2-launch", app, argc, argv, [&] { return gemma2::Run(a); });
}
