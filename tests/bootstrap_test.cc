// The control plane's front door under attack: whatever a stranger sends (random bytes, 0xff runs,
// zero and 4 GB length prefixes, half frames then silence, a wrong secret, a rank outside the
// cluster, many connections), it is refused alone with one log line, its descriptor is freed, the
// listener uses no CPU afterwards, and a real rank still joins.
#include "rpc/bootstrap.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <random>
#include <thread>

#include "rpc/auth.h"
#include "rpc/wire.h"
#include "tests/cluster_util.h"

namespace gemma2::rpc {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

const std::vector<uint8_t> kSecret(32, 7);
const std::vector<uint8_t> kCoordAddress = {1, 2, 3, 4};

std::vector<uint8_t> Addr(std::initializer_list<uint8_t> b) { return b; }

int OpenFds() {
  int n = 0;
  DIR* d = opendir("/proc/self/fd");
  while (readdir(d) != nullptr) ++n;
  closedir(d);
  return n;
}

double CpuSeconds() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_utime.tv_sec + u.ru_stime.tv_sec) +
         static_cast<double>(u.ru_utime.tv_usec + u.ru_stime.tv_usec) * 1e-6;
}

// Reads whatever the listener sends until it closes the connection (or 5 s pass).
std::vector<uint8_t> DrainUntilClosed(int fd) {
  timeval tv{5, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  std::vector<uint8_t> all;
  uint8_t buf[4096];
  while (true) {
    const ssize_t n = recv(fd, buf, sizeof(buf), 0);
    if (n <= 0) break;
    all.insert(all.end(), buf, buf + n);
  }
  return all;
}

class BootstrapTest : public ::testing::Test {
 protected:
  void SetUp() override {
    BootstrapListener::Options o;
    o.secret = kSecret;
    o.world = 2;
    o.ucx_address = kCoordAddress;
    o.handshake_timeout = 1500ms;
    o.log = [this](const std::string& line) {
      std::lock_guard<std::mutex> l(mu_);
      log_.push_back(line);
    };
    auto l = BootstrapListener::Listen(std::move(o));
    ASSERT_TRUE(l.ok()) << l.status().ToString();
    listener_ = std::move(l).value();
  }
  // Serves the listener on this thread until `until`, collecting whoever joins.
  std::vector<Joined> Serve(std::chrono::milliseconds for_how_long) {
    std::vector<Joined> joined;
    std::vector<bool> taken(2, false);
    const auto end = Clock::now() + for_how_long;
    while (Clock::now() < end) {
      auto j = listener_->Next(50ms, taken);
      EXPECT_TRUE(j.ok()) << j.status().ToString();
      if (j.ok() && j->has_value()) {
        taken[(*j)->rank] = true;
        joined.push_back(**j);
      }
    }
    return joined;
  }
  size_t LogLines() {
    std::lock_guard<std::mutex> l(mu_);
    return log_.size();
  }
  std::string Log() {
    std::lock_guard<std::mutex> l(mu_);
    std::string s;
    for (auto& line : log_) s += line + "\n";
    return s;
  }
  std::unique_ptr<BootstrapListener> listener_;
  std::mutex mu_;
  std::vector<std::string> log_;
};

TEST_F(BootstrapTest, ARankJoinsAndBothSidesProveTheSecret) {
  std::vector<uint8_t> got;
  std::thread worker([&] {
    auto a = JoinCluster("127.0.0.1", listener_->port(), 1, kSecret, Addr({9, 9, 9}), 5s);
    ASSERT_TRUE(a.ok()) << a.status().ToString();
    got = *a;
  });
  std::vector<Joined> joined;
  for (auto start = Clock::now(); joined.empty() && Clock::now() - start < 5s;) joined = Serve(100ms);
  worker.join();
  ASSERT_EQ(joined.size(), 1u);
  EXPECT_EQ(joined[0].rank, 1u);
  EXPECT_EQ(joined[0].ucx_address, (std::vector<uint8_t>{9, 9, 9}));
  EXPECT_EQ(got, kCoordAddress);
}

TEST_F(BootstrapTest, WrongSecretAndForeignRanksAreRefusedAlone) {
  const std::vector<uint8_t> wrong(32, 8);
  Status wrong_secret, outside, second;
  std::thread peers([&] {
    wrong_secret = JoinCluster("127.0.0.1", listener_->port(), 0, wrong, Addr({1}), 5s).status();
    outside = JoinCluster("127.0.0.1", listener_->port(), 7, kSecret, Addr({1}), 5s).status();
    ASSERT_TRUE(JoinCluster("127.0.0.1", listener_->port(), 0, kSecret, Addr({1}), 5s).ok());
    second = JoinCluster("127.0.0.1", listener_->port(), 0, kSecret, Addr({1}), 5s).status();
  });
  const std::vector<Joined> joined = Serve(1500ms);
  peers.join();
  ASSERT_EQ(joined.size(), 1u);
  EXPECT_NE(wrong_secret.message().find("wrong cluster secret (claimed rank 0)"), std::string::npos)
      << wrong_secret.ToString();
  EXPECT_EQ(wrong_secret.code(), StatusCode::kInvalidArgument);  // final: the worker gives up
  EXPECT_NE(outside.message().find("rank 7 is outside the cluster"), std::string::npos);
  EXPECT_NE(second.message().find("rank 0 has already joined"), std::string::npos);
  EXPECT_EQ(LogLines(), 3u) << Log();
  EXPECT_NE(Log().find("refused control connection from 127.0.0.1:"), std::string::npos);
}

// A coordinator that does not hold the secret (an impostor on the port: it opens with a nonce and
// accepts anything) cannot prove it, so the worker refuses to take steps from it.
TEST(BootstrapJoinTest, AnImpostorCoordinatorIsRefused) {
  const int srv = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
  ASSERT_EQ(bind(srv, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
  ASSERT_EQ(listen(srv, 4), 0);
  socklen_t len = sizeof(a);
  getsockname(srv, reinterpret_cast<sockaddr*>(&a), &len);
  std::thread impostor([&] {
    const int fd = accept(srv, nullptr, nullptr);
    const Nonce nonce{};
    const auto hello = Frame(MessageType::kHello, nonce);
    (void)!send(fd, hello.data(), hello.size(), MSG_NOSIGNAL);
    uint8_t buf[4096];
    (void)!recv(fd, buf, sizeof(buf), 0);  // the worker's proof, ignored
    Writer w;
    w.Bytes(std::vector<uint8_t>(32, 0));  // a MAC made up
    w.Bytes(std::vector<uint8_t>{6, 6, 6});
    const auto ok = Frame(MessageType::kAuthOk, w.out());
    (void)!send(fd, ok.data(), ok.size(), MSG_NOSIGNAL);
    DrainUntilClosed(fd);
    close(fd);
  });
  const Status st = JoinCluster("127.0.0.1", ntohs(a.sin_port), 0, kSecret, Addr({1}), 3s).status();
  impostor.join();
  close(srv);
  EXPECT_NE(st.message().find("could not prove the cluster secret"), std::string::npos)
      << st.ToString();
}

TEST_F(BootstrapTest, HostileBytesAreRefusedAndTheListenerStaysIdle) {
  const int fds_before = OpenFds();
  std::atomic<bool> done{false};
  std::thread attacker([&] {
    std::mt19937 rng(5);
    auto send_and_close = [&](const std::vector<uint8_t>& bytes, bool wait_for_close) {
      const int fd = DialLoopback(listener_->port());
      ASSERT_GE(fd, 0);
      (void)!send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL);
      if (wait_for_close) DrainUntilClosed(fd);
      close(fd);
    };
    for (size_t n : {1, 12, 16, 100, 4096, 65536}) {
      std::vector<uint8_t> junk(n);
      for (auto& b : junk) b = static_cast<uint8_t>(rng());
      send_and_close(junk, true);
      send_and_close(std::vector<uint8_t>(n, 0xff), true);
    }
    // Valid headers with a zero and a 4 GB length, and a header then silence.
    for (uint32_t len : {0u, 0xffffffffu, 100u}) {
      Writer w;
      w.U32(kMagic);
      w.U8(kVersion & 0xff);
      w.U8(kVersion >> 8);
      w.U8(static_cast<uint8_t>(MessageType::kAuth));
      w.U8(0);
      w.U32(len);
      send_and_close(w.out(), true);
    }
    // Half a header, then silence until the listener gives up on it.
    send_and_close({'G', '2'}, true);
    // 500 connect-and-close.
    for (int i = 0; i < 500; ++i) {
      const int fd = DialLoopback(listener_->port());
      if (fd >= 0) close(fd);
    }
    done = true;
  });
  (void)Serve(100ms);
  while (!done) (void)Serve(100ms);
  attacker.join();
  (void)Serve(2000ms);  // the silent ones time out (1.5 s)
  EXPECT_EQ(OpenFds(), fds_before) << "a descriptor was kept";
  // Idle afterwards: waiting 1 s costs (almost) no CPU.
  const double cpu0 = CpuSeconds();
  (void)Serve(1000ms);
  EXPECT_LT(CpuSeconds() - cpu0, 0.05);
  // Each refusal is one line; a real rank still joins.
  EXPECT_GE(LogLines(), 16u) << Log();
  std::thread worker([&] {
    EXPECT_TRUE(JoinCluster("127.0.0.1", listener_->port(), 0, kSecret, Addr({5}), 5s).ok());
  });
  std::vector<Joined> joined;
  for (auto start = Clock::now(); joined.empty() && Clock::now() - start < 5s;) joined = Serve(100ms);
  worker.join();
  EXPECT_EQ(joined.size(), 1u);
}

// More silent connections than handshakes allowed at once: the surplus is refused at once, and a
// real rank that tries meanwhile is told to come back (kUnavailable), not hung.
TEST_F(BootstrapTest, TooManySilentConnectionsAreRefusedNotQueued) {
  std::vector<int> silent;
  for (int i = 0; i < 70; ++i) silent.push_back(DialLoopback(listener_->port()));
  (void)Serve(300ms);
  Status st;
  std::thread worker(
      [&] { st = JoinCluster("127.0.0.1", listener_->port(), 0, kSecret, Addr({5}), 3s).status(); });
  (void)Serve(500ms);
  worker.join();
  EXPECT_EQ(st.code(), StatusCode::kUnavailable) << st.ToString();
  EXPECT_NE(st.message().find("too many handshakes"), std::string::npos) << st.ToString();
  for (int fd : silent) close(fd);
  (void)Serve(2000ms);
  std::thread again([&] { EXPECT_TRUE(JoinCluster("127.0.0.1", listener_->port(), 0, kSecret, Addr({5}), 3s).ok()); });
  std::vector<Joined> joined;
  for (auto start = Clock::now(); joined.empty() && Clock::now() - start < 5s;) joined = Serve(100ms);
  again.join();
  EXPECT_EQ(joined.size(), 1u);
}

TEST(BootstrapListenTest, RebindsAtOnceAndOnlyOnTheGivenAddress) {
  BootstrapListener::Options o;
  o.secret = kSecret;
  auto a = BootstrapListener::Listen(o);
  ASSERT_TRUE(a.ok());
  const int port = (*a)->port();
  // A connection left in TIME_WAIT by the listener's side closing first.
  const int fd = DialLoopback(port);
  ASSERT_GE(fd, 0);
  (void)(*a)->Next(100ms, {});
  a->reset();
  close(fd);
  o.port = port;
  auto b = BootstrapListener::Listen(o);
  EXPECT_TRUE(b.ok()) << b.status().ToString();
  // Bound to 127.0.0.1 only: another loopback address of the same port is not served.
  const int other = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  inet_pton(AF_INET, "127.0.0.2", &addr.sin_addr);
  EXPECT_NE(connect(other, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  close(other);
}

}  // namespace
}  // namespace gemma2::rpc
