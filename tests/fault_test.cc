// The cluster's blast radius, attacked with real processes (gemma2-launch, its workers) on
// loopback: hostile bytes on every port any of them listens on, strangers and dead ranks during
// startup, a rank stopped mid-stream, a coordinator its workers can no longer hear. Each attack
// costs at most the request or the peer it came with; what the cluster must show afterwards is in
// docs/testing.md ("Attacks").
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <thread>

#include "rpc/wire.h"
#include "tests/cluster_util.h"
#include "tests/test_files.h"

namespace gemma2 {
namespace {

using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

std::string Bin(const std::string& name) { return std::string(GEMMA2_BINARY_DIR) + "/bin/" + name; }

// TCP ports process `pid` listens on (ss), any address.
std::set<int> ListeningPorts(pid_t pid) {
  std::set<int> ports;
  std::istringstream in(Shell("ss -ltnpH 2>/dev/null"));
  std::string line;
  const std::string tag = "pid=" + std::to_string(pid) + ",";
  while (std::getline(in, line)) {
    if (line.find(tag) == std::string::npos) continue;
    std::istringstream f(line);
    std::string state, recvq, sendq, local;
    f >> state >> recvq >> sendq >> local;
    ports.insert(std::atoi(local.c_str() + local.rfind(':') + 1));
  }
  return ports;
}

int FdCount(pid_t pid) {
  int n = 0;
  std::error_code ec;
  for (auto it = std::filesystem::directory_iterator("/proc/" + std::to_string(pid) + "/fd", ec);
       !ec && it != std::filesystem::directory_iterator(); it.increment(ec)) {
    ++n;
  }
  return n;
}

// Alive and not a zombie.
bool Running(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string stat((std::istreambuf_iterator<char>(in)), {});
  if (stat.empty()) return false;
  const char state = stat[stat.rfind(')') + 2];
  return state != 'Z' && state != 'X';
}

// Connects to 127.0.0.1:port, sends `bytes`, waits `linger`, closes. False if nobody listens.
bool Hit(int port, const std::vector<uint8_t>& bytes, std::chrono::milliseconds linger = 20ms) {
  const int fd = DialLoopback(port);
  if (fd < 0) return false;
  if (!bytes.empty()) (void)!send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL);
  std::this_thread::sleep_for(linger);
  close(fd);
  return true;
}

// The attacks of issue 13, each a list of byte strings sent on fresh connections.
std::vector<std::vector<uint8_t>> Attacks() {
  std::mt19937 rng(13);
  auto random = [&](size_t n) {
    std::vector<uint8_t> v(n);
    for (auto& b : v) b = static_cast<uint8_t>(rng());
    return v;
  };
  auto header = [](uint32_t len) {  // a control-frame header: "G2CP", version, kAuth, length
    std::vector<uint8_t> h = {'G', '2', 'C', 'P', static_cast<uint8_t>(rpc::kVersion), 0, 2, 0};
    for (int i = 0; i < 4; ++i) h.push_back(static_cast<uint8_t>(len >> (8 * i)));
    return h;
  };
  std::vector<std::vector<uint8_t>> a = {
      std::vector<uint8_t>(16, 0xff), std::vector<uint8_t>(4096, 0xff), random(1), random(16),
      random(4096),                   random(65536),                    header(0), header(0xffffffffu),
      header(100),                    {'G', '2'},                       {}};
  // Zero and 4 GB length prefixes in the other common shapes (u32 / u64 little-endian).
  a.push_back({0, 0, 0, 0});
  a.push_back({0xff, 0xff, 0xff, 0xff});
  a.push_back({0, 0, 0, 0, 1, 0, 0, 0});
  return a;
}

class FaultTest : public ::testing::Test {
 protected:
  void SetUp() override {
    model_ = (dir_.path() / "model").string();
    ASSERT_EQ(std::system((Bin("gemma2-make-checkpoint") + " --out " + model_ +
                           " --seed 5 > /dev/null 2>&1")
                              .c_str()),
              0);
  }
  // The greedy tokens of a fixed prompt, from the server in `ready`.
  static nlohmann::json Greedy(const std::string& ready) {
    const auto j = nlohmann::json::parse(CompletionInNamespace("", ready, "5,17,42,99,7"), nullptr, false);
    return j.is_discarded() ? nlohmann::json() : j["choices"][0]["token_ids"];
  }
  testing::TempDir dir_;
  std::string model_;
};

// Random bytes, 0xff runs, zero and 4 GB length prefixes, half frames then silence, an empty
// connection, and 200 connect-and-close on every port the launcher or a worker listens on (HTTP,
// UCX's transport, Gloo): afterwards the same greedy tokens, no process gone, no descriptor kept,
// and the processes idle again within 2 s.
TEST_F(FaultTest, HostileBytesOnEveryListeningPortLeaveTheClusterServing) {
  Launched l = StartLauncher(model_, "--tp 2");
  const std::string ready = ReadLine(l.out);
  ASSERT_NE(ready.find("ready"), std::string::npos) << ready;
  const nlohmann::json before = Greedy(ready);
  ASSERT_EQ(before.size(), 4u);
  const std::vector<pid_t> pids = {l.pid, WorkerPid(0, model_), WorkerPid(1, model_)};
  std::map<pid_t, int> fds;
  std::vector<std::pair<pid_t, int>> targets;
  for (pid_t p : pids) {
    ASSERT_GT(p, 0);
    fds[p] = FdCount(p);
    for (int port : ListeningPorts(p)) targets.emplace_back(p, port);
  }
  ASSERT_GE(targets.size(), 3u) << "HTTP, and UCX's and Gloo's ports of the workers";
  // No worker holds the launcher's HTTP listener (descriptors are not inherited).
  const int http = std::atoi(ready.c_str() + ready.rfind(':') + 1);
  EXPECT_EQ(ListeningPorts(pids[1]).count(http), 0u);
  EXPECT_EQ(ListeningPorts(pids[2]).count(http), 0u);
  // UCX and the collectives listen on the cluster's address only (loopback here).
  EXPECT_EQ(Shell("ss -ltnpH 2>/dev/null | grep -E 'pid=(" + std::to_string(pids[0]) + "|" +
                  std::to_string(pids[1]) + "|" + std::to_string(pids[2]) +
                  "),' | awk '{print $4}' | grep -v '^127\\.' | grep -v '^\\[::ffff:127\\.'"),
            "");
  for (const auto& [owner, port] : targets) {
    for (const auto& bytes : Attacks()) Hit(port, bytes);
    for (int i = 0; i < 200; ++i) Hit(port, {}, 0ms);
    for (pid_t p : pids) ASSERT_TRUE(Running(p)) << "pid " << p << " died after port " << port;
    EXPECT_EQ(Greedy(ready), before) << "after port " << port << " of pid " << owner;
  }
  // Idle within 2 s: over the next second the three processes use under 0.1 s of CPU.
  std::this_thread::sleep_for(2s);
  double cpu0 = 0, cpu1 = 0;
  for (pid_t p : pids) cpu0 += ProcessCpuSeconds(p);
  std::this_thread::sleep_for(1s);
  for (pid_t p : pids) cpu1 += ProcessCpuSeconds(p);
  EXPECT_LT(cpu1 - cpu0, 0.1);
  for (pid_t p : pids) EXPECT_EQ(FdCount(p), fds[p]) << "pid " << p << " kept a descriptor";
  kill(l.pid, SIGTERM);
  double s = 0;
  EXPECT_EQ(WaitExit(l.pid, &s), 0);
  fclose(l.out);
  EXPECT_EQ(Alive(model_), 0);
}

// A rank killed before it reaches the coordinator ends the launch at once (the coordinator
// watches the processes it started), naming the rank and how it ended.
TEST_F(FaultTest, ARankKilledBeforeJoiningEndsTheLaunchAtOnce) {
  const RunResult r =
      Exec("GEMMA2_FAULT_RANK=1 GEMMA2_FAULT_KILL_BEFORE_JOIN=1",
           "--model " + model_ + " --prompt-ids 5,17 --max-new-tokens 2 --launch local --tp 2");
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.err.find("startup: rank 1 (pid "), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("killed by signal 9"), std::string::npos) << r.err;
  EXPECT_LT(r.seconds, 3.0) << r.err;
  EXPECT_EQ(Alive(model_), 0);
}

// While gemma2-coordinator waits for its ranks, strangers hit its control port (junk, a
// half frame left open, a worker with the wrong secret): each is refused alone with a log line,
// and the real ranks still join and serve.
TEST_F(FaultTest, StrangersAtStartupAreRefusedAloneAndStartupCompletes) {
  const std::string secret = (dir_.path() / "secret").string();
  const std::string wrong = (dir_.path() / "wrong").string();
  std::ofstream(secret) << "0123456789abcdef0123456789abcdef";
  std::ofstream(wrong) << "fedcba9876543210fedcba9876543210";
  const int port = 21000 + (getpid() * 13) % 11000;
  const std::string master = "127.0.0.1:" + std::to_string(port);
  Launched c = StartLauncher(model_, "--tp 2 --master " + master + " --secret-file " + secret, "",
                             "gemma2-coordinator");
  bool listening = false;
  for (int i = 0; i < 100 && !listening; ++i) {
    listening = Hit(port, {}, 0ms);
    if (!listening) std::this_thread::sleep_for(50ms);
  }
  ASSERT_TRUE(listening);
  for (const auto& bytes : Attacks()) Hit(port, bytes);
  std::thread silent([&] { Hit(port, {'G', '2', 'C', 'P'}, 3s); });  // a half frame, held open
  const std::string worker = Bin("gemma2-worker") + " --coordinator " + master +
                             " --tp 2 --model " + model_ + " --backend cpu --connect-timeout 30";
  const std::string stranger = Shell(worker + " --rank 1 --secret-file " + wrong + " 2>&1");
  EXPECT_NE(stranger.find("wrong cluster secret"), std::string::npos) << stranger;
  for (int r = 0; r < 2; ++r) {
    ASSERT_EQ(std::system((worker + " --rank " + std::to_string(r) + " --secret-file " + secret +
                           " > /dev/null 2>&1 &")
                              .c_str()),
              0);
  }
  // The refusals come first in the coordinator's output, then its ready line.
  std::string ready, log;
  for (int i = 0; i < 64 && ready.find("ready") == std::string::npos; ++i) {
    ready = ReadLine(c.out);
    log += ready;
  }
  silent.join();
  ASSERT_NE(ready.find("gemma2-coordinator: ready"), std::string::npos) << log;
  EXPECT_NE(log.find("refused control connection from 127.0.0.1:"), std::string::npos) << log;
  EXPECT_NE(log.find("wrong cluster secret (claimed rank 1)"), std::string::npos) << log;
  EXPECT_EQ(Greedy(ready).size(), 4u);
  kill(c.pid, SIGTERM);
  double s = 0;
  EXPECT_EQ(WaitExit(c.pid, &s), 0);
  fclose(c.out);
  for (int i = 0; i < 100 && Alive(model_) > 0; ++i) std::this_thread::sleep_for(50ms);
  EXPECT_EQ(Alive(model_), 0);
}

// A rank stopped (SIGSTOP) mid-stream: its control thread no longer answers heartbeats, so the
// stream gets an error event naming that rank within the heartbeat timeout (10 s), not the 60 s
// step timeout; then every process goes, the stopped one by SIGKILL.
TEST_F(FaultTest, ARankStoppedMidStreamIsNamedWithinTheHeartbeatTimeout) {
  Launched l = StartLauncher(model_, "--tp 2");
  const std::string ready = ReadLine(l.out);
  ASSERT_NE(ready.find("ready"), std::string::npos) << ready;
  const std::string url = UrlOf(ready);
  FILE* stream = popen(("curl -sN --max-time 60 " + url +
                        "/v1/completions -H 'Content-Type: application/json' -d '{\"prompt\": "
                        "[5, 17], \"max_tokens\": 8000, \"ignore_eos\": true, \"stream\": true}'")
                           .c_str(),
                       "r");
  int events = 0;
  std::string line, error;
  for (char buf[65536]; fgets(buf, sizeof(buf), stream);) {
    line = buf;
    if (line.rfind("data: ", 0) != 0) continue;
    if (line.find("\"error\"") != std::string::npos) {
      error = line;
      break;
    }
    if (++events == 3) {
      kill(WorkerPid(1, model_), SIGSTOP);
      break;
    }
  }
  const auto stopped = Clock::now();
  for (char buf[65536]; error.empty() && fgets(buf, sizeof(buf), stream);) {
    line = buf;
    if (line.find("\"error\"") != std::string::npos) error = line;
  }
  const double seconds = std::chrono::duration<double>(Clock::now() - stopped).count();
  pclose(stream);
  EXPECT_NE(error.find("rank 1 has not answered a heartbeat"), std::string::npos) << error;
  EXPECT_LT(seconds, 12.0);
  double s = 0;
  EXPECT_EQ(WaitExit(l.pid, &s), 1);
  fclose(l.out);
  for (int i = 0; i < 100 && Alive(model_) > 0; ++i) std::this_thread::sleep_for(100ms);
  EXPECT_EQ(Alive(model_), 0);
}

// A coordinator its workers can no longer hear (here stopped; a crash or a partition alike): each
// worker leaves within --heartbeat-timeout instead of running on.
TEST_F(FaultTest, WorkersLeaveACoordinatorTheyCanNoLongerHear) {
  Launched l = StartLauncher(model_, "--tp 2 --heartbeat-timeout 2");
  const std::string ready = ReadLine(l.out);
  ASSERT_NE(ready.find("ready"), std::string::npos) << ready;
  const pid_t w0 = WorkerPid(0, model_), w1 = WorkerPid(1, model_);
  ASSERT_GT(w0, 0);
  ASSERT_GT(w1, 0);
  kill(l.pid, SIGSTOP);
  const auto t0 = Clock::now();
  while ((Running(w0) || Running(w1)) && Clock::now() - t0 < 10s) std::this_thread::sleep_for(50ms);
  const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  EXPECT_FALSE(Running(w0));
  EXPECT_FALSE(Running(w1));
  EXPECT_LT(seconds, 3.5);  // 2 s of silence, then the way out
  kill(l.pid, SIGKILL);
  double s = 0;
  WaitExit(l.pid, &s);
  fclose(l.out);
  EXPECT_EQ(Alive(model_), 0);
  // The killed coordinator left nothing in /tmp: its secret's directory went once all had joined.
  const std::string mine = "gemma2-cluster-" + std::to_string(l.pid) + "-";
  for (const auto& e : std::filesystem::directory_iterator("/tmp"))
    EXPECT_NE(e.path().filename().string().rfind(mine, 0), 0u) << e.path();
}

// A fan-out whose ssh fails (a wrong key: ssh says so and exits 255 at once) ends the launch at
// once, with the node's name and ssh's own words, instead of waiting out the startup timeout.
TEST_F(FaultTest, AFailedSshEndsTheFanOutAtOnceWithItsWords) {
  const std::string ssh = (dir_.path() / "failing-ssh").string();
  std::ofstream(ssh) << "#!/bin/sh\necho \"$1: Permission denied (publickey).\" >&2\nexit 255\n";
  std::filesystem::permissions(ssh, std::filesystem::perms::owner_all);
  const std::string secret = (dir_.path() / "secret").string();
  std::ofstream(secret) << "fedcba9876543210fedcba9876543210";
  const auto t0 = Clock::now();
  Launched head = StartLauncher(
      model_, "--tp 2 --hosts 127.0.0.1,127.0.0.2 --control-port " +
                  std::to_string(21000 + (getpid() * 17) % 11000) + " --secret-file " + secret +
                  " --ssh " + ssh);
  std::string log;
  for (std::string line; !(line = ReadLine(head.out)).empty();) log += line;
  double s = 0;
  EXPECT_EQ(WaitExit(head.pid, &s), 1);
  const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  fclose(head.out);
  EXPECT_LT(seconds, 2.0) << log;
  EXPECT_NE(log.find("node 1 (127.0.0.2)'s session"), std::string::npos) << log;
  EXPECT_NE(log.find("exited with status 255"), std::string::npos) << log;
  EXPECT_NE(log.find("127.0.0.2: Permission denied (publickey)."), std::string::npos) << log;
  for (int i = 0; i < 100 && Alive(model_) > 0; ++i) std::this_thread::sleep_for(50ms);
  EXPECT_EQ(Alive(model_), 0);
}

// Two nodes in network namespaces (coordinator and stage 0 on one, stage 1 on the other), the
// link between them cut mid-stream and then while idle: each time the stream gets an error event
// and /ready turns 503 within 12 s, every process on both nodes is gone within 20 s, and the
// cluster relaunches on the same control port at once.
TEST_F(FaultTest, PartitionsEndBothNodesCleanlyAndTheClusterRelaunchesAtOnce) {
  TwoNamespaces ns("p", 235);
  if (!ns.ok()) GTEST_SKIP() << "skipped: cannot create network namespaces here (needs root and iproute2)";
  const std::string secret = (dir_.path() / "secret").string();
  std::ofstream(secret) << "0123456789abcdef0123456789abcdef";
  const std::string master = "10.235.0.1:" + std::to_string(20000 + getpid() % 20000);
  const std::string common = "--tp 2 --nodes 2 --master " + master + " --secret-file " + secret;
  auto start = [&](const std::string& space, const std::string& args) {
    return StartLauncher(model_, common + args, "env UCX_TLS=tcp ip netns exec " + space + " ");
  };
  auto curl = [&](const std::string& url, const std::string& rest) {
    return "ip netns exec " + ns.a() + " curl -sS --max-time 30 " + url + rest;
  };
  for (const bool mid_stream : {true, false}) {
    SCOPED_TRACE(mid_stream ? "mid-stream" : "idle");
    ASSERT_TRUE(ns.SetLink(true));
    const auto launched = Clock::now();
    Launched node0 = start(ns.a(), " --host 10.235.0.1");
    Launched node1 = start(ns.b(), " --node-rank 1 --address 10.235.0.2");
    const std::string ready = ReadLine(node0.out);
    ASSERT_NE(ready.find("ready: 4 ranks"), std::string::npos) << ready;
    // Relaunched on the same control port right after the last round's processes ended.
    EXPECT_LT(std::chrono::duration<double>(Clock::now() - launched).count(), 15.0);
    const std::string url = UrlOf(ready);
    FILE* stream = nullptr;
    if (mid_stream) {
      stream = popen((curl(url, "/v1/completions") +
                      " -N -H 'Content-Type: application/json' -d '{\"prompt\": [5, 17], "
                      "\"max_tokens\": 8000, \"ignore_eos\": true, \"stream\": true}'")
                         .c_str(),
                     "r");
      int events = 0;
      for (char buf[65536]; events < 3 && fgets(buf, sizeof(buf), stream);) {
        if (std::string(buf).rfind("data: ", 0) == 0) ++events;
      }
      ASSERT_EQ(events, 3);
    }
    ASSERT_TRUE(ns.SetLink(false));
    const auto cut = Clock::now();
    if (mid_stream) {
      std::string error;
      for (char buf[65536]; error.empty() && fgets(buf, sizeof(buf), stream);) {
        if (std::string(buf).find("\"error\"") != std::string::npos) error = buf;
      }
      pclose(stream);
      EXPECT_NE(error.find("has not answered a heartbeat"), std::string::npos) << error;
      EXPECT_LT(std::chrono::duration<double>(Clock::now() - cut).count(), 12.0);
    }
    // /ready says 503 within 12 s (while the coordinator lingers, or it is gone altogether).
    bool unready = false;
    while (!unready && Clock::now() - cut < 12s) {
      const std::string code = Shell(curl(url, "/ready") + " -o /dev/null -w '%{http_code}' 2>/dev/null");
      unready = code == "503" || code == "000";
      if (!unready) std::this_thread::sleep_for(200ms);
    }
    EXPECT_TRUE(unready);
    double s0 = 0, s1 = 0;
    EXPECT_EQ(WaitExit(node0.pid, &s0), 1);
    EXPECT_EQ(WaitExit(node1.pid, &s1), 1);
    fclose(node0.out);
    fclose(node1.out);
    while (Alive(model_) > 0 && Clock::now() - cut < 20s) std::this_thread::sleep_for(100ms);
    EXPECT_EQ(Alive(model_), 0);
    EXPECT_LT(std::chrono::duration<double>(Clock::now() - cut).count(), 20.0);
  }
}

}  // namespace
}  // namespace gemma2
