#include "rpc/bootstrap.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "rpc/auth.h"
#include "rpc/wire.h"

namespace gemma2::rpc {
namespace {

using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

std::string Errno(const std::string& what) { return what + ": " + std::strerror(errno); }

std::string PeerOf(const sockaddr_in& a) {
  char buf[INET_ADDRSTRLEN] = "?";
  inet_ntop(AF_INET, &a.sin_addr, buf, sizeof(buf));
  return std::string(buf) + ":" + std::to_string(ntohs(a.sin_port));
}

Result<sockaddr_in> SockAddr(const std::string& host, int port) {
  ASSIGN_OR_RETURN(const std::string ip, ResolveIpv4(host));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  inet_pton(AF_INET, ip.c_str(), &a.sin_addr);
  return a;
}

// Best effort, never blocking: the socket is new and the frame small, so it fits its buffer.
void SendFrameNow(int fd, MessageType type, std::span<const uint8_t> payload) {
  const std::vector<uint8_t> f = Frame(type, payload);
  (void)!send(fd, f.data(), f.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
}

int MillisLeft(Clock::time_point deadline) {
  const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
  return static_cast<int>(std::clamp<int64_t>(left.count(), 0, 1 << 30));
}

// Blocking-with-deadline helpers for the worker's side.
Status WriteAll(int fd, std::span<const uint8_t> b, Clock::time_point deadline) {
  size_t off = 0;
  while (off < b.size()) {
    const ssize_t n = send(fd, b.data() + off, b.size() - off, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n > 0) {
      off += static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && errno != EAGAIN && errno != EINTR)
      return Status(StatusCode::kUnavailable, Errno("sending the handshake"));
    pollfd p{fd, POLLOUT, 0};
    if (poll(&p, 1, MillisLeft(deadline)) == 0)
      return Status(StatusCode::kDeadlineExceeded, "sending the handshake: timed out");
  }
  return OkStatus();
}

Status ReadAll(int fd, uint8_t* out, size_t len, Clock::time_point deadline) {
  size_t off = 0;
  while (off < len) {
    const ssize_t n = recv(fd, out + off, len - off, MSG_DONTWAIT);
    if (n > 0) {
      off += static_cast<size_t>(n);
      continue;
    }
    if (n == 0) return Status(StatusCode::kUnavailable, "the coordinator closed the connection");
    if (errno != EAGAIN && errno != EINTR)
      return Status(StatusCode::kUnavailable, Errno("reading the handshake"));
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, MillisLeft(deadline)) == 0)
      return Status(StatusCode::kDeadlineExceeded, "waiting for the coordinator's handshake");
  }
  return OkStatus();
}

Result<Received> ReadFrame(int fd, Clock::time_point deadline) {
  uint8_t header[kHeaderBytes];
  RETURN_IF_ERROR(ReadAll(fd, header, sizeof(header), deadline));
  ASSIGN_OR_RETURN(FrameHeader h, ParseHeader(header));
  if (h.payload_bytes > kMaxHandshakePayload)
    return InvalidArgument("handshake frame of " + std::to_string(h.payload_bytes) + " bytes");
  Received r{h.type, std::vector<uint8_t>(h.payload_bytes)};
  RETURN_IF_ERROR(ReadAll(fd, r.payload.data(), r.payload.size(), deadline));
  return r;
}

// The coordinator's refusal: kUnavailable (busy: try again) stays so; anything else (a wrong
// secret, a rank taken) is final.
Status Refusal(const Received& frame, const std::string& where) {
  Status remote;
  RETURN_IF_ERROR(DecodeStatus(frame.payload, &remote));
  return Status(remote.code() == StatusCode::kUnavailable ? StatusCode::kUnavailable
                                                          : StatusCode::kInvalidArgument,
                "coordinator " + where + ": " + remote.message());
}

struct Fd {
  int fd = -1;
  ~Fd() {
    if (fd >= 0) close(fd);
  }
};

}  // namespace

Result<std::string> ResolveIpv4(const std::string& host) {
  in_addr a{};
  if (inet_pton(AF_INET, host.c_str(), &a) == 1) return host;
  addrinfo hints{}, *res = nullptr;
  hints.ai_family = AF_INET;
  if (getaddrinfo(host.c_str(), nullptr, &hints, &res) != 0 || res == nullptr) {
    return InvalidArgument("cannot resolve host '" + host + "'");
  }
  char buf[INET_ADDRSTRLEN];
  inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(res->ai_addr)->sin_addr, buf, sizeof(buf));
  freeaddrinfo(res);
  return std::string(buf);
}

struct BootstrapListener::Pending {
  int fd = -1;
  std::string peer;
  Nonce nonce{};
  Clock::time_point deadline;
  uint8_t header[kHeaderBytes] = {};
  size_t got = 0;  // bytes of the header, then of the payload
  bool in_payload = false;
  std::vector<uint8_t> payload;
};

Result<std::unique_ptr<BootstrapListener>> BootstrapListener::Listen(Options opts) {
  std::unique_ptr<BootstrapListener> l(new BootstrapListener());
  l->opts_ = std::move(opts);
  const std::string where = l->opts_.host + ":" + std::to_string(l->opts_.port);
  ASSIGN_OR_RETURN(sockaddr_in addr, SockAddr(l->opts_.host, l->opts_.port));
  l->fd_ = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (l->fd_ < 0) return Internal(Errno("control plane socket"));
  const int one = 1;
  setsockopt(l->fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (bind(l->fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      listen(l->fd_, 128) != 0) {
    return Status(StatusCode::kUnavailable, Errno("control plane: listening on " + where));
  }
  socklen_t len = sizeof(addr);
  getsockname(l->fd_, reinterpret_cast<sockaddr*>(&addr), &len);
  l->port_ = ntohs(addr.sin_port);
  return l;
}

BootstrapListener::~BootstrapListener() {
  for (auto& p : pending_) close(p->fd);
  if (fd_ >= 0) close(fd_);
}

void BootstrapListener::Drop(size_t i, const std::string& why, StatusCode code) {
  Pending& p = *pending_[i];
  if (!why.empty()) {
    SendFrameNow(p.fd, MessageType::kError, EncodeStatus(Status(code, "refused: " + why)));
    if (opts_.log) opts_.log("refused control connection from " + p.peer + ": " + why);
  }
  close(p.fd);
  pending_.erase(pending_.begin() + static_cast<std::ptrdiff_t>(i));
}

void BootstrapListener::AcceptAll() {
  if (Clock::now() < accept_paused_until_) return;
  while (true) {
    sockaddr_in from{};
    socklen_t len = sizeof(from);
    const int fd = accept4(fd_, reinterpret_cast<sockaddr*>(&from), &len,
                           SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
        // Out of descriptors: leave the backlog alone for a while instead of spinning on it.
        accept_paused_until_ = Clock::now() + 100ms;
        if (opts_.log) opts_.log(Errno("control plane: accept paused"));
      }
      return;  // EAGAIN: nothing more; other errors concern that one connection only
    }
    auto p = std::make_unique<Pending>();
    p->fd = fd;
    p->peer = PeerOf(from);
    p->deadline = Clock::now() + opts_.handshake_timeout;
    pending_.push_back(std::move(p));
    if (pending_.size() > opts_.max_pending) {
      Drop(pending_.size() - 1, "too many handshakes in progress", StatusCode::kUnavailable);
      continue;
    }
    auto nonce = FreshNonce();
    if (!nonce.ok()) {
      Drop(pending_.size() - 1, nonce.status().message());
      continue;
    }
    pending_.back()->nonce = *nonce;
    SendFrameNow(fd, MessageType::kHello, *nonce);
  }
}

bool BootstrapListener::ReadFrom(Pending& p, std::string* why) {
  while (true) {
    uint8_t* dst = p.in_payload ? p.payload.data() + p.got : p.header + p.got;
    const size_t want = (p.in_payload ? p.payload.size() : kHeaderBytes) - p.got;
    if (want > 0) {
      const ssize_t n = recv(p.fd, dst, want, MSG_DONTWAIT);
      if (n == 0) {
        *why = "closed before completing the handshake";
        return false;
      }
      if (n < 0) {
        if (errno == EAGAIN || errno == EINTR) return false;
        *why = Errno("reading");
        return false;
      }
      p.got += static_cast<size_t>(n);
      if (static_cast<size_t>(n) < want) return false;
    }
    if (p.in_payload) return true;
    auto h = ParseHeader(p.header);
    if (!h.ok()) {
      *why = h.status().message();
      return false;
    }
    if (h->type != MessageType::kAuth) {
      *why = "expected an authentication frame, got type " +
             std::to_string(static_cast<int>(h->type));
      return false;
    }
    if (h->payload_bytes > kMaxHandshakePayload) {
      *why = "handshake frame of " + std::to_string(h->payload_bytes) + " bytes";
      return false;
    }
    p.in_payload = true;
    p.got = 0;
    p.payload.resize(h->payload_bytes);
  }
}

Result<std::optional<Joined>> BootstrapListener::Next(std::chrono::milliseconds max_wait,
                                                      const std::vector<bool>& taken) {
  const auto until = Clock::now() + max_wait;
  while (true) {
    AcceptAll();
    // Handshakes past their deadline go first.
    const auto now = Clock::now();
    for (size_t i = pending_.size(); i-- > 0;) {
      if (now > pending_[i]->deadline) Drop(i, "no handshake within the deadline", StatusCode::kUnavailable);
    }
    std::vector<pollfd> fds;
    fds.push_back({fd_, static_cast<short>(now < accept_paused_until_ ? 0 : POLLIN), 0});
    for (auto& p : pending_) fds.push_back({p->fd, POLLIN, 0});
    // Wake for the earliest of: the caller's limit, a handshake's deadline, accepting again.
    auto wake = until;
    for (auto& p : pending_) wake = std::min(wake, p->deadline);
    if (now < accept_paused_until_) wake = std::min(wake, accept_paused_until_);
    const int ready = poll(fds.data(), fds.size(), MillisLeft(wake) + 1);
    if (ready < 0 && errno != EINTR) return Internal(Errno("control plane: poll"));
    for (size_t i = pending_.size(); i-- > 0;) {
      if (fds[i + 1].revents == 0) continue;
      Pending& p = *pending_[i];
      std::string why;
      if (!ReadFrom(p, &why)) {
        if (!why.empty()) Drop(i, why);
        continue;
      }
      // A complete frame: rank | nonce_w | MAC | Bytes(address).
      Reader rd(p.payload);
      uint32_t rank = 0;
      std::vector<uint8_t> their_nonce, mac, address;
      Nonce nonce_w{};
      const bool shaped = rd.U32(&rank).ok() && rd.Bytes(&their_nonce, sizeof(Nonce)).ok() &&
                          their_nonce.size() == sizeof(Nonce) &&
                          rd.Bytes(&mac, sizeof(Mac)).ok() && rd.Bytes(&address, kMaxHandshakePayload).ok() &&
                          rd.Done().ok() && !address.empty();
      if (!shaped) {
        Drop(i, "malformed authentication frame");
        continue;
      }
      if (rank >= opts_.world) {
        Drop(i, "rank " + std::to_string(rank) + " is outside the cluster (" +
                    std::to_string(opts_.world) + " ranks)");
        continue;
      }
      if (!VerifyAuth(opts_.secret, p.nonce, rank, mac, address)) {
        Drop(i, "wrong cluster secret (claimed rank " + std::to_string(rank) + ")");
        continue;
      }
      if (rank < taken.size() && taken[rank]) {
        Drop(i, "rank " + std::to_string(rank) + " has already joined");
        continue;
      }
      std::copy(their_nonce.begin(), their_nonce.end(), nonce_w.begin());
      const Mac ours = AuthMac(opts_.secret, nonce_w, kCoordinatorRank, opts_.ucx_address);
      Writer w;
      w.Bytes(ours);
      w.Bytes(opts_.ucx_address);
      SendFrameNow(p.fd, MessageType::kAuthOk, w.out());
      Joined j{rank, std::move(address), p.peer};
      close(p.fd);
      pending_.erase(pending_.begin() + static_cast<std::ptrdiff_t>(i));
      return std::optional<Joined>(std::move(j));
    }
    if (Clock::now() >= until) return std::optional<Joined>();
  }
}

Result<std::vector<uint8_t>> JoinCluster(const std::string& host, int port, uint32_t rank,
                                         std::span<const uint8_t> secret,
                                         std::span<const uint8_t> ucx_address,
                                         std::chrono::milliseconds timeout) {
  const std::string where = host + ":" + std::to_string(port);
  const auto deadline = Clock::now() + timeout;
  ASSIGN_OR_RETURN(sockaddr_in addr, SockAddr(host, port));
  Fd s;
  s.fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (s.fd < 0) return Internal(Errno("socket"));
  if (connect(s.fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    if (errno != EINPROGRESS) return Status(StatusCode::kUnavailable, Errno("connecting to " + where));
    pollfd p{s.fd, POLLOUT, 0};
    if (poll(&p, 1, MillisLeft(deadline)) == 0)
      return Status(StatusCode::kUnavailable, "connecting to " + where + ": timed out");
    int err = 0;
    socklen_t len = sizeof(err);
    getsockopt(s.fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err != 0) {
      errno = err;
      return Status(StatusCode::kUnavailable, Errno("connecting to " + where));
    }
  }
  ASSIGN_OR_RETURN(Received hello, ReadFrame(s.fd, deadline));
  if (hello.type == MessageType::kError) return Refusal(hello, where);
  if (hello.type != MessageType::kHello || hello.payload.size() != sizeof(Nonce))
    return InvalidArgument(where + " did not open with a nonce (not a gemma2 coordinator?)");
  Nonce nonce_c{}, nonce_w{};
  std::copy(hello.payload.begin(), hello.payload.end(), nonce_c.begin());
  ASSIGN_OR_RETURN(nonce_w, FreshNonce());
  Writer w;
  w.U32(rank);
  w.Bytes(nonce_w);
  w.Bytes(AuthMac(secret, nonce_c, rank, ucx_address));
  w.Bytes(ucx_address);
  RETURN_IF_ERROR(WriteAll(s.fd, Frame(MessageType::kAuth, w.out()), deadline));
  ASSIGN_OR_RETURN(Received answer, ReadFrame(s.fd, deadline));
  if (answer.type == MessageType::kError) return Refusal(answer, where);
  Reader rd(answer.payload);
  std::vector<uint8_t> mac, address;
  if (answer.type != MessageType::kAuthOk || !rd.Bytes(&mac, sizeof(Mac)).ok() ||
      !rd.Bytes(&address, kMaxHandshakePayload).ok() || !rd.Done().ok() || address.empty()) {
    return InvalidArgument("coordinator " + where + " answered the handshake with a malformed frame");
  }
  if (!VerifyAuth(secret, nonce_w, kCoordinatorRank, mac, address))
    return InvalidArgument("coordinator " + where + " could not prove the cluster secret");
  return address;
}

}  // namespace gemma2::rpc
