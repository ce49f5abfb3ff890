// Helpers for tests that run real clusters as processes: gemma2-run and gemma2-launch started
// and watched, their workers found, network namespaces as hosts.
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <sstream>
#include <string>

#include <gtest/gtest.h>

namespace gemma2 {

// What `cmd` prints on stdout (its exit status in *code when asked).
inline std::string Shell(const std::string& cmd, int* code = nullptr) {
  FILE* p = popen(cmd.c_str(), "r");
  std::string out;
  char buf[4096];
  size_t got;
  while ((got = fread(buf, 1, sizeof(buf), p)) > 0) out.append(buf, got);
  const int status = pclose(p);
  if (code) *code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return out;
}

// A TCP connection to 127.0.0.1:port (rcvbuf > 0: that receive buffer, set before connecting);
// -1 when nobody listens.
inline int DialLoopback(int port, int rcvbuf = 0) {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (rcvbuf > 0) setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof(rcvbuf));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
  if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

// CPU seconds (user + system) process `pid` has used; 0 once it is gone.
inline double ProcessCpuSeconds(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string stat((std::istreambuf_iterator<char>(in)), {});
  if (stat.empty()) return 0;
  std::istringstream rest(stat.substr(stat.rfind(')') + 2));
  std::string field;
  double ticks = 0;
  for (int i = 3; i <= 15 && rest >> field; ++i) {
    if (i == 14 || i == 15) ticks += std::atof(field.c_str());  // utime, stime
  }
  return ticks / static_cast<double>(sysconf(_SC_CLK_TCK));
}

// The server URL a launcher's ready line names ("" when none).
inline std::string UrlOf(const std::string& ready_line) {
  const auto at = ready_line.find("http://");
  if (at == std::string::npos) return "";
  return ready_line.substr(at, ready_line.find_first_of(" \n", at) - at);
}

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
  const std::string url = UrlOf(ready_line);
  if (url.empty()) return "";
  std::string cmd =
      (ns.empty() ? "" : "ip netns exec " + ns + " ") + "curl -sS --max-time 60 " + url;
  cmd += "/v1/completions -H 'Content-Type: application/json' -d '{\"prompt\": [" + ids;
  cmd +=
      "], \"max_tokens\": 4, \"temperature\": 0, \"ignore_eos\": true, \"return_token_ids\": "
      "true}'";
  return Shell(cmd);
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

// Lines from `f` until one holds `needle` (or `max_lines` went by, or the stream ended): all of
// them, so a failure shows what came instead (log lines come between the ones a test awaits).
inline std::string ReadUntil(FILE* f, const std::string& needle, int max_lines = 64) {
  std::string all;
  char buf[4096];
  for (int i = 0; i < max_lines && fgets(buf, sizeof(buf), f); ++i) {
    all += buf;
    if (std::string(buf).find(needle) != std::string::npos) break;
  }
  return all;
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
