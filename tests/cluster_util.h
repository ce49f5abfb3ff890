// Helpers for tests that run real clusters as processes: gemma2-run and gemma2-launch started
// and watched, their workers found, network namespaces as hosts.
#pragma once

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <string>

#include <gtest/gtest.h>

namespace gemma2 {

struct RunResult {
  int code = -1;
  std::string out, err;
  double seconds = 0;
};

inline RunResult Exec(const std::string& env, const std::string& args) {
  const std::string err_file = ::testing::TempDir() + "/cluster_err_" + std::to_string(getpid()) +
                               "_" + std::to_string(std::chrono::steady_clock::now().time_since_epoch().count());
  const std::string cmd =
      env + " " + std::string(GEMMA2_BINARY_DIR) + "/bin/gemma2-run " + args + " 2>" + err_file;
  RunResult r;
  const auto start = std::chrono::steady_clock::now();
  FILE* p = popen(cmd.c_str(), "r");
  char buf[4096];
  size_t got;
  while ((got = fread(buf, 1, sizeof(buf), p)) > 0) r.out.append(buf, got);
  const int status = pclose(p);
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  std::ifstream in(err_file);
  r.err.assign(std::istreambuf_iterator<char>(in), {});
  std::remove(err_file.c_str());
  return r;
}

// Processes whose command line mentions `marker` (a test's private model directory).
inline int Alive(const std::string& marker) {
  // "[/]tmp/..." matches the marker but not this pgrep's own shell command line.
  const std::string pattern = "[" + marker.substr(0, 1) + "]" + marker.substr(1);
  FILE* p = popen(("pgrep -f -c -- '" + pattern + "'").c_str(), "r");
  int n = 0;
  if (fscanf(p, "%d", &n) != 1) n = 0;
  pclose(p);
  return n;
}
// The reference prompt's greedy completion from the server named in `ready_line`, asked with curl
// from inside namespace `ns` (the server's address is only reachable there).
inline std::string CompletionInNamespace(const std::string& ns, const std::string& ready_line,
                                  const std::string& ids) {
  const auto at = ready_line.find("http://");
  if (at == std::string::npos) return "";
  const std::string url = ready_line.substr(at, ready_line.find_first_of(" \n", at) - at);
  std::string cmd =
      (ns.empty() ? "" : "ip netns exec " + ns + " ") + "curl -sS --max-time 60 " + url;
  cmd += "/v1/completions -H 'Content-Type: application/json' -d '{\"prompt\": [" + ids;
  cmd +=
      "], \"max_tokens\": 4, \"temperature\": 0, \"ignore_eos\": true, \"return_token_ids\": "
      "true}'";
  FILE* p = popen(cmd.c_str(), "r");
  std::string answer;
  char buf[65536];
  size_t got;
  while ((got = fread(buf, 1, sizeof(buf), p)) > 0) answer.append(buf, got);
  pclose(p);
  return answer;
}

// Two "hosts" on this machine: network namespaces joined by a veth pair, 10.NET.0.1 and
// 10.NET.0.2; removed again with the object. ok() is false where they cannot be made (not root).
class TwoNamespaces {
 public:
  TwoNamespaces(const std::string& tag, int net) {
    const std::string id = std::to_string(getpid() % 100000);
    a_ = "g2" + tag + "a" + id;
    b_ = "g2" + tag + "b" + id;
    va_ = "g2" + tag + "va" + id;
    vb_ = "g2" + tag + "vb" + id;
    const std::string &va = va_, &vb = vb_;
    const std::string prefix = "10." + std::to_string(net) + ".0.";
    std::string setup = "ip netns add " + a_ + " && ip netns add " + b_;
    setup += " && ip link add " + va + " type veth peer name " + vb;
    setup += " && ip link set " + va + " netns " + a_ + " && ip link set " + vb + " netns " + b_;
    setup += " && ip -n " + a_ + " addr add " + prefix + "1/24 dev " + va;
    setup += " && ip -n " + b_ + " addr add " + prefix + "2/24 dev " + vb;
    setup += " && ip -n " + a_ + " link set lo up && ip -n " + b_ + " link set lo up";
    setup +=
        " && ip -n " + a_ + " link set " + va + " up && ip -n " + b_ + " link set " + vb + " up";
    ok_ = geteuid() == 0 && std::system((setup + " 2>/dev/null").c_str()) == 0;
  }
  ~TwoNamespaces() {
    std::system(
        ("ip netns del " + a_ + " 2>/dev/null; ip netns del " + b_ + " 2>/dev/null").c_str());
  }
  bool ok() const { return ok_; }
  // Takes the link between the two hosts down (a partition) or up again.
  bool SetLink(bool up) const {
    const std::string state = up ? " up" : " down";
    return std::system(("ip -n " + a_ + " link set " + va_ + state + " && ip -n " + b_ +
                        " link set " + vb_ + state)
                           .c_str()) == 0;
  }
  const std::string& a() const { return a_; }
  const std::string& b() const { return b_; }

 private:
  std::string a_, b_, va_, vb_;
  bool ok_ = false;
};

// gemma2-launch: ready only after a token went through every rank; SIGTERM stops everything
// (exit 0); a worker killed later ends the launcher (exit 1, naming the rank) within 5 s.
struct Launched {
  pid_t pid = -1;
  FILE* out = nullptr;
};

// gemma2-launch with its stdout and stderr in `out`; `wrapper` runs it (e.g. "env UCX_TLS=tcp
// ip netns exec ns1 ").
inline Launched StartLauncher(const std::string& model, const std::string& args,
                       const std::string& wrapper = "",
                       const std::string& program = "gemma2-launch") {
  std::string cmd = "exec " + wrapper + std::string(GEMMA2_BINARY_DIR);
  cmd += "/bin/" + program + " --port 0 --model " + model + " " + args;
  if (args.find("--backend") == std::string::npos) cmd += " --backend cpu";  // also on GPU hosts
  cmd += " 2>&1";
  int fds[2];
  EXPECT_EQ(pipe(fds), 0);
  Launched l;
  l.pid = fork();
  if (l.pid == 0) {
    dup2(fds[1], 1);
    close(fds[0]);
    execl("/bin/sh", "sh", "-c", cmd.c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  close(fds[1]);
  l.out = fdopen(fds[0], "r");
  return l;
}

inline std::string ReadLine(FILE* f) {
  char buf[4096];
  return fgets(buf, sizeof(buf), f) ? std::string(buf) : std::string();
}

// The pid of the worker of `rank` serving `model` (0: none).
inline int WorkerPid(int rank, const std::string& model) {
  FILE* p =
      popen(("pgrep -f -- '[-]-rank " + std::to_string(rank) + " .*" + model + "'").c_str(), "r");
  int pid = 0;
  if (fscanf(p, "%d", &pid) != 1) pid = 0;
  pclose(p);
  return pid;
}

inline int WaitExit(pid_t pid, double* seconds) {
  const auto start = std::chrono::steady_clock::now();
  int status = 0;
  waitpid(pid, &status, 0);
  *seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

}  // namespace gemma2
