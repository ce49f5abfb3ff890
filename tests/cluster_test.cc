// gemma2-run --launch local: the same requests through a real local cluster (a coordinator and a
// gemma2-worker process per rank, UCX control plane, Gloo collectives) print what the in-process
// run prints; and every fault ends the run with the rank and the reason, in bounded time, with no
// process left behind.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <thread>

#include "tests/cluster_util.h"
#include "tests/reference_util.h"
#include "tests/test_files.h"

namespace gemma2 {
namespace {

using Clock = std::chrono::steady_clock;


class ClusterTest : public ::testing::Test {
 protected:
  void SetUp() override {
    // A private copy of a reference model: its path marks this test's processes.
    const auto src =
        std::filesystem::path(GEMMA2_SOURCE_DIR) / "tests/data/references/gqa4_window_published";
    model_ = dir_.path() / "model";
    std::filesystem::copy(src, model_);
    ref_ = testing::LoadReference(src);
    for (int32_t id : ref_.prompt_ids) {
      if (!ids_.empty()) ids_ += ',';
      ids_ += std::to_string(id);
    }
  }
  // A server's completion JSON carries the one-process greedy tokens,
  // and no process of this test is left.
  void ExpectOneProcessTokens(const std::string& answer, const std::string& log = "") {
    const RunResult one = Exec("", Args("--max-new-tokens 4"));
    ASSERT_EQ(one.code, 0) << one.err;
    const auto j = nlohmann::json::parse(answer, nullptr, false);
    ASSERT_FALSE(j.is_discarded()) << answer << log;
    EXPECT_EQ(j["choices"][0]["token_ids"], nlohmann::json::parse(one.out)["generated_ids"])
        << answer;
    EXPECT_EQ(Alive(model_.string()), 0);
  }
  std::string Args(const std::string& extra) const {
    return "--model " + model_.string() + " --prompt-ids " + ids_ + " --ignore-eos " + extra;
  }
  testing::TempDir dir_;
  std::filesystem::path model_;
  testing::Reference ref_;
  std::string ids_;
};

TEST_F(ClusterTest, LocalClusterPrintsWhatTheInProcessRunPrints) {
  const RunResult one = Exec("", Args("--max-new-tokens 8 --logits"));
  ASSERT_EQ(one.code, 0) << one.err;
  const auto want = nlohmann::json::parse(one.out);
  // Tensor parallel, pipeline parallel (4 layers in 2 or 4 stages) and both: 2 to 4 processes.
  for (const std::string layout : {"--tp 2", "--tp 4", "--pp 2", "--pp 4", "--tp 2 --pp 2"}) {
    SCOPED_TRACE(layout);
    const RunResult r = Exec("", Args("--max-new-tokens 8 --logits --launch local " + layout));
    ASSERT_EQ(r.code, 0) << r.err;
    const auto got = nlohmann::json::parse(r.out);
    EXPECT_EQ(got["generated_ids"], want["generated_ids"]);
    EXPECT_EQ(got["generated_ids"].get<std::vector<int32_t>>(),
              ref_.generated_ids);  // and transformers'
    ASSERT_EQ(got["logits"].size(), want["logits"].size());
    for (size_t row = 0; row < want["logits"].size(); ++row) {
      const auto a = got["logits"][row].get<std::vector<float>>();
      const auto b = want["logits"][row].get<std::vector<float>>();
      EXPECT_LE(testing::RelativeL2(a.data(), b.data(), static_cast<int64_t>(a.size())), 1e-5)
          << row;
      EXPECT_LE(testing::RelativeL2(a.data(), ref_.logits.data() + row * ref_.width, ref_.width),
                1e-4)
          << row;
    }
  }
  EXPECT_EQ(Alive(model_.string()), 0);
}

TEST_F(ClusterTest, SampledTokensEqualTheInProcessDraws) {
  const RunResult one = Exec("", Args("--max-new-tokens 10 --temperature 6 --seed 11"));
  const RunResult two =
      Exec("", Args("--max-new-tokens 10 --temperature 6 --seed 11 --launch local --tp 2 --pp 2"));
  ASSERT_EQ(one.code, 0) << one.err;
  ASSERT_EQ(two.code, 0) << two.err;
  EXPECT_EQ(nlohmann::json::parse(two.out)["generated_ids"],
            nlohmann::json::parse(one.out)["generated_ids"]);
}

TEST_F(ClusterTest, ClassifierThroughPipelineStages) {
  const auto dir =
      std::filesystem::path(GEMMA2_SOURCE_DIR) / "tests/data/references/seqcls_published";
  const auto ref = testing::LoadReference(dir);
  std::string ids;
  for (int32_t id : ref.prompt_ids) {
    if (!ids.empty()) ids += ',';
    ids += std::to_string(id);
  }
  const RunResult r = Exec(
      "", "--model " + dir.string() + " --prompt-ids " + ids + " --launch local --tp 2 --pp 3");
  ASSERT_EQ(r.code, 0) << r.err;
  const auto got = nlohmann::json::parse(r.out)["logits"][0].get<std::vector<float>>();
  ASSERT_EQ(static_cast<int64_t>(got.size()), ref.width);
  EXPECT_LE(testing::RelativeL2(got.data(), ref.logits.data(), ref.width), 1e-4);
}


// Two "nodes" on one machine: network namespaces joined by a veth pair. The coordinator and
// stage 0 (ranks 0, 1) run in one, stage 1 (ranks 2, 3) in the other: the control plane (UCX over
// TCP) and the pipeline's activations (Gloo) cross the link.
TEST_F(ClusterTest, TwoNodesInNetworkNamespaces) {
  TwoNamespaces ns("t", 231);
  if (!ns.ok())
    GTEST_SKIP() << "skipped: cannot create network namespaces here (needs root and iproute2)";
  const std::string &a = ns.a(), &b = ns.b();
  const RunResult one = Exec("", Args("--max-new-tokens 4 --logits"));
  const RunResult two = Exec("UCX_TLS=tcp ip netns exec " + a,
                             Args("--max-new-tokens 4 --logits --launch local --tp 2 --pp 2 "
                                  "--listen 10.231.0.1 --node-exec 'ip netns exec " +
                                  a + "' --node-address 10.231.0.1 --node-exec 'ip netns exec " +
                                  b + "' --node-address 10.231.0.2"));
  ASSERT_EQ(one.code, 0) << one.err;
  ASSERT_EQ(two.code, 0) << two.err;
  const auto want = nlohmann::json::parse(one.out), got = nlohmann::json::parse(two.out);
  EXPECT_EQ(got["generated_ids"], want["generated_ids"]);
  ASSERT_EQ(got["logits"].size(), want["logits"].size());
  for (size_t row = 0; row < want["logits"].size(); ++row) {
    const auto x = got["logits"][row].get<std::vector<float>>(),
               y = want["logits"][row].get<std::vector<float>>();
    EXPECT_LE(testing::RelativeL2(x.data(), y.data(), static_cast<int64_t>(x.size())), 1e-5) << row;
  }
  EXPECT_EQ(Alive(model_.string()), 0);
}

TEST_F(ClusterTest, LauncherStartsReportsReadyAndStopsOnSigterm) {
  Launched l = StartLauncher(model_.string(), "--tp 2 --nodes 2");
  const std::string line = ReadLine(l.out);
  EXPECT_NE(line.find("gemma2-launch: ready: 4 ranks (tp 2 x pp 2)"), std::string::npos) << line;
  // cpu ranks keep KV in host memory: the budget is the one asked for (--kv-blocks default)
  EXPECT_NE(line.find("KV budget 65536 blocks of 16"), std::string::npos) << line;
  EXPECT_EQ(Alive(model_.string()), 5);  // launcher + 4 workers
  kill(l.pid, SIGTERM);
  double s = 0;
  EXPECT_EQ(WaitExit(l.pid, &s), 0);
  EXPECT_LT(s, 10);
  fclose(l.out);
  EXPECT_EQ(Alive(model_.string()), 0);
}

// gemma2-coordinator starts no worker: both ranks' gemma2-worker processes are started by hand,
// as a job scheduler starts one per GPU — here before the coordinator listens, so they keep
// trying — join with the secret, and the coordinator serves the one-process tokens. SIGTERM
// stops it and the workers with it.
TEST_F(ClusterTest, CoordinatorServesWorkersStartedElsewhere) {
  const std::string secret = (dir_.path() / "secret").string();
  std::ofstream(secret) << "0123456789abcdef0123456789abcdef";
  // Below the ephemeral range (32768 and up), where the workers' own connections take ports.
  const std::string master = "127.0.0.1:" + std::to_string(21000 + (getpid() * 7) % 11000);
  for (int r = 0; r < 2; ++r) {
    std::string cmd = std::string(GEMMA2_BINARY_DIR) + "/bin/gemma2-worker --coordinator " +
                      master + " --rank " + std::to_string(r) + " --tp 2 --model " +
                      model_.string() + " --secret-file " + secret +
                      " --backend cpu --connect-timeout 30 > /dev/null 2>&1 &";
    ASSERT_EQ(std::system(cmd.c_str()), 0);
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  Launched c =
      StartLauncher(model_.string(), "--tp 2 --master " + master + " --secret-file " + secret, "",
                    "gemma2-coordinator");
  const std::string ready = ReadLine(c.out);
  EXPECT_NE(ready.find("gemma2-coordinator: ready: 2 ranks (tp 2 x pp 1)"), std::string::npos)
      << ready;
  const std::string answer = CompletionInNamespace("", ready, ids_);
  kill(c.pid, SIGTERM);
  double s = 0;
  EXPECT_EQ(WaitExit(c.pid, &s), 0);
  fclose(c.out);
  for (int i = 0; i < 100 && Alive(model_.string()) > 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ExpectOneProcessTokens(answer);
}

TEST_F(ClusterTest, LauncherEndsWhenAWorkerDies) {
  Launched l = StartLauncher(model_.string(), "--tp 2");
  const std::string line = ReadLine(l.out);
  ASSERT_NE(line.find("ready"), std::string::npos) << line;
  const int worker = WorkerPid(1, model_.string());
  ASSERT_GT(worker, 0);
  kill(worker, SIGKILL);
  const std::string err = ReadUntil(l.out, "gemma2-launch: error:");
  double s = 0;
  EXPECT_EQ(WaitExit(l.pid, &s), 1);
  EXPECT_LT(s, 5);
  EXPECT_NE(err.find("gemma2-launch: error: rank 1 lost"), std::string::npos) << err;
  fclose(l.out);
  EXPECT_EQ(Alive(model_.string()), 0);
}

TEST_F(ClusterTest, LauncherFindsAHungIdleWorkerThroughHeartbeats) {
  Launched l = StartLauncher(model_.string(), "--tp 2 --heartbeat-timeout 1.5");
  const std::string line = ReadLine(l.out);
  ASSERT_NE(line.find("ready"), std::string::npos) << line;
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));  // a few healthy rounds first
  const int worker = WorkerPid(1, model_.string());
  ASSERT_GT(worker, 0);
  kill(worker, SIGSTOP);
  const std::string err = ReadUntil(l.out, "gemma2-launch: error:");
  double s = 0;
  EXPECT_EQ(WaitExit(l.pid, &s), 1);
  EXPECT_LT(s, 10);  // 1.5 s heartbeat timeout, then the shutdown grace
  EXPECT_NE(err.find("rank 1 has not answered a heartbeat"), std::string::npos) << err;
  fclose(l.out);
  EXPECT_EQ(Alive(model_.string()), 0);
}

// The rank with the wrong secret is refused alone (one line naming the peer); it exits, and the
// launch ends at once naming that rank and its exit status (not at the startup timeout).
TEST_F(ClusterTest, WrongSecretIsRefusedAtStartup) {
  const RunResult r =
      Exec("GEMMA2_FAULT_WRONG_SECRET_RANK=1", Args("--max-new-tokens 2 --launch local --tp 2"));
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.err.find("refused control connection from 127.0.0.1:"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("wrong cluster secret (claimed rank 1)"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("startup: rank 1 (pid "), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("exited with status 1"), std::string::npos) << r.err;
  EXPECT_LT(r.seconds, 5);
  EXPECT_EQ(Alive(model_.string()), 0);
}

// The coordinator's block tables cover the smallest rank's pool: workers whose pools got fewer
// blocks than asked (GEMMA2_TEST_KV_BLOCKS stands in for a GPU's memory) lower the budget; the
// block size asked for is every pool's. A block size out of range is refused with the reason.
TEST_F(ClusterTest, KvBudgetFollowsTheWorkersPools) {
  Launched l = StartLauncher(model_.string(), "--tp 2 --kv-blocks 4096 --block-size 8",
                             "env GEMMA2_TEST_KV_BLOCKS=100 ");
  std::string line = ReadLine(l.out);
  EXPECT_NE(line.find("KV budget 100 blocks of 8"), std::string::npos) << line;
  kill(l.pid, SIGTERM);
  double s = 0;
  EXPECT_EQ(WaitExit(l.pid, &s), 0);
  fclose(l.out);
  l = StartLauncher(model_.string(), "--tp 2 --block-size 0");
  line = ReadLine(l.out);
  EXPECT_NE(WaitExit(l.pid, &s), 0) << line;
  fclose(l.out);
  EXPECT_NE(line.find("--block-size"), std::string::npos) << line;
  EXPECT_EQ(Alive(model_.string()), 0);
}

// More GPU ranks on a node than it has GPUs: refused before any worker starts, naming the node and
// both counts (no GPU is needed to see it).
TEST_F(ClusterTest, MoreGpuRanksThanGpusIsRefusedAtLaunch) {
  Launched l = StartLauncher(model_.string(), "--backend cuda --gpus-per-node 1 --tp 2");
  const std::string line = ReadLine(l.out);
  double seconds = 0;
  EXPECT_EQ(WaitExit(l.pid, &seconds), 1) << line;
  fclose(l.out);
  EXPECT_NE(line.find("node 0 runs 2 GPU ranks but has 1 GPU (--gpus-per-node)"), std::string::npos)
      << line;
  EXPECT_LT(seconds, 20);
  EXPECT_EQ(Alive(model_.string()), 0);
}

TEST_F(ClusterTest, KilledWorkerFailsTheRunNamingItsRank) {
  const RunResult r = Exec("GEMMA2_FAULT_RANK=1 GEMMA2_FAULT_KILL_AFTER_STEPS=2",
                           Args("--max-new-tokens 8 --launch local --tp 2"));
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.err.find("gemma2-run: error: step: rank 1 lost"), std::string::npos) << r.err;
  EXPECT_LT(r.seconds, 10);  // noticed within 5 s of the kill, plus startup
  EXPECT_EQ(Alive(model_.string()), 0);
}

TEST_F(ClusterTest, HungWorkerEndsInTheStepWatchdog) {
  const RunResult r = Exec("GEMMA2_FAULT_RANK=0 GEMMA2_FAULT_STOP_AFTER_STEPS=2",
                           Args("--max-new-tokens 8 --launch local --tp 2 --step-timeout 2"));
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.err.find("no answer from rank(s) 0"), std::string::npos) << r.err;
  EXPECT_LT(r.seconds, 15);
  EXPECT_EQ(Alive(model_.string()), 0);
}

TEST_F(ClusterTest, WorkersDieWithTheCoordinator) {
  const pid_t pid = fork();
  if (pid == 0) {
    const std::string bin = std::string(GEMMA2_BINARY_DIR) + "/bin/gemma2-run";
    const std::string model = model_.string();
    execl(bin.c_str(), bin.c_str(), "--model", model.c_str(), "--prompt-ids", "2,3,4",
          "--ignore-eos", "--max-new-tokens", "1000", "--launch", "local", "--tp", "2",
          static_cast<char*>(nullptr));
    _exit(127);
  }
  // Wait until both workers run, then kill the coordinator.
  const auto start = Clock::now();
  while (Alive("--model " + model_.string() + " --secret-file") < 2 &&
         Clock::now() - start < std::chrono::seconds(20)) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ASSERT_GE(Alive(model_.string()), 3) << "coordinator and two workers";
  kill(pid, SIGKILL);
  waitpid(pid, nullptr, 0);
  const auto killed = Clock::now();
  while (Alive(model_.string()) > 0 && Clock::now() - killed < std::chrono::seconds(10)) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_EQ(Alive(model_.string()), 0);
  EXPECT_LT(std::chrono::duration<double>(Clock::now() - killed).count(), 5.0);
}

}  // namespace
}  // namespace gemma2

namespace gemma2 {
namespace {

// Per-node mode across two "hosts" (network namespaces joined by veth): node 0's gemma2-launch is
// the coordinator and starts the first half of the ranks; node 1's starts the rest, which connect
// to the master with the shared secret and meet their peers through the control plane's
// rendezvous. Two layouts: a pipeline stage per node (--tp 2 --nodes 2), and one tensor-parallel
// group across both nodes (--tp 2 --pp 1 --nodes 2: every all-reduce crosses the link). The
// answer equals the one-process run; SIGTERM on the master stops both nodes (exit 0 each).
TEST_F(ClusterTest, PerNodeLaunchAcrossNamespaces) {
  TwoNamespaces ns("n", 233);
  if (!ns.ok())
    GTEST_SKIP() << "skipped: cannot create network namespaces here (needs root and iproute2)";
  const std::string &a = ns.a(), &b = ns.b();
  const std::string secret = (dir_.path() / "secret").string();
  std::ofstream(secret) << "0123456789abcdef0123456789abcdef";
  struct Layout {
    std::string args, ready, node1;
  };
  int port = 20000 + getpid() % 20000;
  for (const Layout& l :
       {Layout{"--tp 2 --nodes 2", "ready: 4 ranks (tp 2 x pp 2)", "ranks 2..3"},
        Layout{"--tp 2 --pp 1 --nodes 2", "ready: 2 ranks (tp 2 x pp 1)", "ranks 1..1"}}) {
    SCOPED_TRACE(l.args);
    const std::string master = "10.233.0.1:" + std::to_string(port++);
    const std::string common = l.args + " --master " + master + " --secret-file " + secret;
    auto start = [&](const std::string& space, const std::string& args) {
      return StartLauncher(model_.string(), common + args,
                           "env UCX_TLS=tcp ip netns exec " + space + " ");
    };
    Launched node0 = start(a, " --host 10.233.0.1");
    Launched node1 = start(b, " --node-rank 1 --address 10.233.0.2");
    const std::string ready = ReadLine(node0.out), started = ReadLine(node1.out);
    EXPECT_NE(ready.find(l.ready), std::string::npos) << ready;
    EXPECT_NE(started.find("node 1 started " + l.node1), std::string::npos) << started;
    const std::string answer = CompletionInNamespace(a, ready, ids_);
    kill(node0.pid, SIGTERM);
    double s0 = 0, s1 = 0;
    EXPECT_EQ(WaitExit(node0.pid, &s0), 0);
    EXPECT_EQ(WaitExit(node1.pid, &s1), 0);
    EXPECT_LT(s0 + s1, 15);
    fclose(node0.out);
    fclose(node1.out);
    ExpectOneProcessTokens(answer);
  }
}

}  // namespace
}  // namespace gemma2

namespace gemma2 {
namespace {

// Fan-out: `gemma2-launch --hosts H0,H1` on the head node starts node 1's launcher through
// `--ssh` (here a stand-in for ssh that enters H1's network namespace and runs the command with
// sh, as a remote login shell would). Same answer as one process; SIGTERM stops both nodes.
TEST_F(ClusterTest, FanOutStartsTheOtherNodeOverSsh) {
  TwoNamespaces ns("f", 234);
  if (!ns.ok())
    GTEST_SKIP() << "skipped: cannot create network namespaces here (needs root and iproute2)";
  const std::string &a = ns.a(), &b = ns.b();
  const std::string ssh = (dir_.path() / "fake-ssh").string();
  std::ofstream(ssh)
      << "#!/bin/sh\n# fake-ssh HOST COMMAND: HOST's namespace, COMMAND through a shell\n"
      << "case \"$1\" in 10.234.0.2) ns=" << b << ";; *) exit 255;; esac\n"
      << "exec ip netns exec \"$ns\" sh -c \"$2\"\n";
  std::filesystem::permissions(ssh, std::filesystem::perms::owner_all);
  const std::string secret = (dir_.path() / "secret").string();
  std::ofstream(secret) << "fedcba9876543210fedcba9876543210";
  std::string args = "--tp 2 --hosts 10.234.0.1,10.234.0.2 --control-port ";
  args += std::to_string(20000 + getpid() % 20000) + " --secret-file " + secret;
  args += " --ssh " + ssh + " --host 10.234.0.1";
  Launched head = StartLauncher(model_.string(), args, "env UCX_TLS=tcp ip netns exec " + a + " ");
  // Node 1's launcher prints its line into the same stream (through the fake ssh); find ready.
  std::string ready, log;
  for (int i = 0; i < 4 && ready.empty(); ++i) {
    const std::string line = ReadLine(head.out);
    log += line;
    if (line.find("ready") != std::string::npos) ready = line;
  }
  EXPECT_NE(ready.find("ready: 4 ranks (tp 2 x pp 2)"), std::string::npos) << log;
  const std::string answer = CompletionInNamespace(a, ready, ids_);
  kill(head.pid, SIGTERM);
  double s = 0;
  EXPECT_EQ(WaitExit(head.pid, &s), 0);
  EXPECT_LT(s, 15);
  fclose(head.out);
  ExpectOneProcessTokens(answer, log);
}

}  // namespace
}  // namespace gemma2

namespace gemma2 {
namespace {

// Logits rows past the control plane's frame cap (420 rows x 40000 = 67.2 MB > 64 MiB) cross the
// cluster in pieces and equal the one-process rows.
TEST_F(ClusterTest, LogitsPastTheFrameCapCrossTheCluster) {
  const std::string model = (dir_.path() / "wide").string();
  ASSERT_EQ(std::system((std::string(GEMMA2_BINARY_DIR) + "/bin/gemma2-make-checkpoint --out " +
                         model + " --vocab 40000 --hidden 32 --layers 1 --intermediate 64 --heads 2 " +
                         "--kv-heads 1 --head-dim 16 --seed 2 > /dev/null 2>&1")
                            .c_str()),
            0);
  std::string ids;
  for (int i = 0; i < 420; ++i) {
    if (i > 0) ids += ',';
    ids += std::to_string((i * 7919) % 40000);
  }
  const std::string args = "--model " + model + " --prompt-ids " + ids + " --max-new-tokens 1 --logits";
  const RunResult one = Exec("", args);
  const RunResult two = Exec("", args + " --launch local --tp 1");
  ASSERT_EQ(one.code, 0) << one.err;
  ASSERT_EQ(two.code, 0) << two.err;
  const auto want = nlohmann::json::parse(one.out), got = nlohmann::json::parse(two.out);
  ASSERT_EQ(got["logits"].size(), 420u);
  for (size_t row : {size_t{0}, size_t{211}, size_t{419}}) {
    const auto x = got["logits"][row].get<std::vector<float>>(),
               y = want["logits"][row].get<std::vector<float>>();
    ASSERT_EQ(x.size(), 40000u);
    EXPECT_LE(testing::RelativeL2(x.data(), y.data(), static_cast<int64_t>(x.size())), 1e-5) << row;
  }
  EXPECT_EQ(Alive(model), 0);
}

// Random weights named by a spec reach every worker (scale tests without a checkpoint on disk):
// the cluster prints what the one-process run prints, and a bad spec is one line.
TEST_F(ClusterTest, RandomWeightsSpecThroughTheCluster) {
  const std::string spec = "random:" + (model_ / "config.json").string() + ":7:2";
  const std::string ids = " --prompt-ids 2,5,9,11 --max-new-tokens 5 --logits --ignore-eos";
  const RunResult one = Exec("", "--model " + spec + ids);
  const RunResult two = Exec("", "--model " + spec + ids + " --launch local --tp 2 --pp 2");
  ASSERT_EQ(one.code, 0) << one.err;
  ASSERT_EQ(two.code, 0) << two.err;
  const auto want = nlohmann::json::parse(one.out), got = nlohmann::json::parse(two.out);
  EXPECT_EQ(got["generated_ids"], want["generated_ids"]);
  for (size_t row = 0; row < want["logits"].size(); ++row) {
    const auto x = got["logits"][row].get<std::vector<float>>(),
               y = want["logits"][row].get<std::vector<float>>();
    EXPECT_LE(testing::RelativeL2(x.data(), y.data(), static_cast<int64_t>(x.size())), 1e-5) << row;
  }
  const RunResult bad =
      Exec("", "--model random:" + (model_ / "config.json").string() + ":7:99 --prompt-ids 2");
  EXPECT_NE(bad.code, 0);
  EXPECT_NE(bad.err.find("more layers than the shape has"), std::string::npos) << bad.err;
  EXPECT_EQ(Alive(model_.string()), 0);
}

}  // namespace
}  // namespace gemma2
