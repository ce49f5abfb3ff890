// The control plane's transport between real processes on loopback: frames arrive intact, a peer
// killed with SIGKILL or a silent peer ends the wait with an error in bounded time, and a frame
// with a foreign header is refused and the channel closed.
#include "rpc/ucx_channel.h"

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <vector>

namespace gemma2::rpc {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

// A server child: swaps UCX worker addresses with the parent through pipes (the bootstrap's part,
// tested in bootstrap_test), connects to the parent's and runs `serve` on that channel.
struct ServerChild {
  pid_t pid = -1;
  std::vector<uint8_t> address;  // the child's worker address
  int to_child = -1;             // where the parent's address goes
  ~ServerChild() {
    if (pid > 0) {
      kill(pid, SIGKILL);
      waitpid(pid, nullptr, 0);
    }
  }
};

void WriteAddress(int fd, const std::vector<uint8_t>& a) {
  const uint32_t n = static_cast<uint32_t>(a.size());
  if (write(fd, &n, 4) != 4 || write(fd, a.data(), n) != static_cast<ssize_t>(n)) _exit(3);
}

std::vector<uint8_t> ReadAddress(int fd) {
  uint32_t n = 0;
  if (read(fd, &n, 4) != 4 || n > 65536) return {};
  std::vector<uint8_t> a(n);
  size_t got = 0;
  while (got < n) {
    const ssize_t r = read(fd, a.data() + got, n - got);
    if (r <= 0) return {};
    got += static_cast<size_t>(r);
  }
  return a;
}

// Forks first: UCX state must not cross a fork (the parent's node is made after it).
template <typename Serve>
ServerChild StartServer(Serve serve) {
  int up[2], down[2];
  EXPECT_EQ(pipe(up), 0);
  EXPECT_EQ(pipe(down), 0);
  ServerChild s;
  s.pid = fork();
  if (s.pid == 0) {
    close(up[0]);
    close(down[1]);
    auto node = UcxNode::Create();
    if (!node.ok()) _exit(1);
    WriteAddress(up[1], (*node)->address());
    const std::vector<uint8_t> theirs = ReadAddress(down[0]);
    if (theirs.empty()) _exit(2);
    auto ch = (*node)->ConnectTo(theirs, "parent");
    if (!ch.ok()) _exit(4);
    const int code = serve(**ch);
    ch->reset();  // closes with a flush: what was sent arrives before the process ends
    _exit(code);
  }
  close(up[1]);
  close(down[0]);
  s.address = ReadAddress(up[0]);
  close(up[0]);
  s.to_child = down[1];
  return s;
}

// The parent's endpoint to the child; the child connects to `parent` as it gets its address.
Result<std::unique_ptr<Channel>> ConnectToChild(UcxNode& parent, ServerChild& s) {
  WriteAddress(s.to_child, parent.address());
  close(s.to_child);
  s.to_child = -1;
  return parent.ConnectTo(s.address, "server");
}

int ExitCode(ServerChild& s) {
  int status = 0;
  waitpid(s.pid, &status, 0);
  s.pid = -1;
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

TEST(UcxChannelTest, FramesRoundTripBetweenProcesses) {
  auto server = StartServer([](Channel& ch) {
    for (int i = 0; i < 3; ++i) {
      auto m = ch.Receive(10s);
      if (!m.ok()) {
        fprintf(stderr, "server receive: %s\n", m.status().ToString().c_str());
        return 10;
      }
      const Status sent = ch.Send(MessageType::kStepResult, m->payload, 10s);
      if (!sent.ok()) {
        fprintf(stderr, "server send: %s\n", sent.ToString().c_str());
        return 11;
      }
    }
    return 0;
  });
  auto node = UcxNode::Create();
  ASSERT_TRUE(node.ok());
  auto ch = ConnectToChild(**node, server);
  ASSERT_TRUE(ch.ok()) << ch.status().ToString();
  for (size_t size : {size_t{0}, size_t{17}, size_t{3} << 20}) {
    std::vector<uint8_t> payload(size);
    for (size_t i = 0; i < size; ++i) payload[i] = static_cast<uint8_t>(i * 31 + 7);
    const Status sent = (*ch)->Send(MessageType::kStep, payload, 10s);
    ASSERT_TRUE(sent.ok()) << sent.ToString();
    auto back = (*ch)->Receive(10s);
    ASSERT_TRUE(back.ok()) << back.status().ToString() << "; server exit " << ExitCode(server);
    EXPECT_EQ(back->type, MessageType::kStepResult);
    EXPECT_EQ(back->payload, payload);
  }
  ch->reset();
  EXPECT_EQ(ExitCode(server), 0);
}

// A payload past the frame cap travels as kPart pieces and arrives whole where the receiver
// expects that much; where it does not, the pieces are refused once they pass what it expects.
TEST(UcxChannelTest, MessagesPastTheFrameCapArriveInPieces) {
  const size_t big = size_t{kMaxPayload} * 2 + 12345;
  auto server = StartServer([big](Channel& ch) {
    ch.ExpectUpTo(big);
    auto m = ch.Receive(30s);
    if (!m.ok() || m->type != MessageType::kStepResult || m->payload.size() != big) return 10;
    for (size_t i = 0; i < big; i += 4099) {
      if (m->payload[i] != static_cast<uint8_t>(i * 7)) return 11;
    }
    // Not raised again: the next message of that size is refused in pieces.
    auto refused = ch.Receive(30s);
    if (refused.ok() || refused.status().message().find("grew past") == std::string::npos) return 12;
    return 0;
  });
  auto node = UcxNode::Create();
  ASSERT_TRUE(node.ok());
  auto ch = ConnectToChild(**node, server);
  ASSERT_TRUE(ch.ok());
  std::vector<uint8_t> payload(big);
  for (size_t i = 0; i < big; i += 4099) payload[i] = static_cast<uint8_t>(i * 7);
  ASSERT_TRUE((*ch)->Send(MessageType::kStepResult, payload, 30s).ok());
  (void)(*ch)->Send(MessageType::kStepResult, payload, 30s);
  EXPECT_EQ(ExitCode(server), 0) << "10: not whole, 11: damaged, 12: the second not refused";
}

TEST(UcxChannelTest, KilledPeerIsAnErrorNotAHang) {
  auto server = StartServer([](Channel& ch) {
    (void)ch.Receive(30s);
    pause();  // stays until killed
    return 0;
  });
  auto node = UcxNode::Create();
  ASSERT_TRUE(node.ok());
  auto ch = ConnectToChild(**node, server);
  ASSERT_TRUE(ch.ok());
  ASSERT_TRUE((*ch)->Send(MessageType::kHeartbeat, {}, 10s).ok());
  kill(server.pid, SIGKILL);
  const auto start = Clock::now();
  auto r = (*ch)->Receive(30s);
  const double s = std::chrono::duration<double>(Clock::now() - start).count();
  ASSERT_FALSE(r.ok());
  EXPECT_LT(s, 5.0) << r.status().ToString();
  EXPECT_EQ(r.status().code(), StatusCode::kUnavailable) << r.status().ToString();
}

TEST(UcxChannelTest, SilentPeerTimesOut) {
  auto server = StartServer([](Channel& ch) {
    (void)ch.Receive(30s);  // never answers
    return 0;
  });
  auto node = UcxNode::Create();
  ASSERT_TRUE(node.ok());
  auto ch = ConnectToChild(**node, server);
  ASSERT_TRUE(ch.ok());
  const auto start = Clock::now();
  auto r = (*ch)->Receive(1500ms);
  const double s = std::chrono::duration<double>(Clock::now() - start).count();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kDeadlineExceeded);
  EXPECT_LT(s, 4.0);
}

TEST(UcxChannelTest, ForeignHeaderIsRefusedAndClosesTheChannel) {
  auto server = StartServer([](Channel& ch) {
    auto m = ch.Receive(10s);
    if (m.ok()) return 10;
    if (m.status().message().find("bad magic") == std::string::npos) return 11;
    return ch.broken() ? 0 : 12;
  });
  auto node = UcxNode::Create();
  ASSERT_TRUE(node.ok());
  auto ch = ConnectToChild(**node, server);
  ASSERT_TRUE(ch.ok());
  // Twelve bytes that are not a frame header.
  const std::vector<uint8_t> junk = {'G', 'E', 'T', ' ', '/', ' ', 'H', 'T', 'T', 'P', '/', '1'};
  ASSERT_TRUE((*ch)->SendBytes(junk, 10s).ok());
  ch->reset();
  EXPECT_EQ(ExitCode(server), 0) << "10: accepted, 11: other error, 12: channel left open";
}

}  // namespace
}  // namespace gemma2::rpc
