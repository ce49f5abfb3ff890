// The cluster's front door: the only socket a stranger can reach before proving the cluster
// secret. A plain TCP listener (bound to the cluster's address only, close-on-exec, SO_REUSEADDR
// so a restarted coordinator rebinds at once) that runs the handshake and nothing else:
//
//   coordinator -> worker  kHello   nonce_c (32 bytes, fresh per connection)
//   worker -> coordinator  kAuth    rank | nonce_w | HMAC(secret, nonce_c || rank || addr_w) | addr_w
//   coordinator -> worker  kAuthOk  HMAC(secret, nonce_w || kCoordinatorRank || addr_c) | addr_c
//
// (addr_*: UCX worker addresses.) Both sides then connect UCX endpoints to the other's address, so
// UCX itself never accepts a connection from anyone who has not proved the secret, and each side
// knows the other holds it (the worker does not run steps from an impostor).
//
// Every handshake read has a deadline and a size cap; many handshakes run at once on one thread
// (a silent or slow stranger holds up nobody); anything wrong is refused alone: one line through
// the log callback (peer address and reason), the socket closed, nothing kept.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "common/status.h"

namespace gemma2::rpc {

inline constexpr uint32_t kMaxHandshakePayload = 16u << 10;  // a UCX address is a few hundred bytes
inline constexpr uint32_t kCoordinatorRank = 0xffffffffu;    // the rank the coordinator proves as

// A peer that proved the secret for `rank`.
struct Joined {
  uint32_t rank = 0;
  std::vector<uint8_t> ucx_address;
  std::string peer;  // host:port as seen by the listener
};

class BootstrapListener {
 public:
  using Log = std::function<void(const std::string&)>;
  struct Options {
    std::string host = "127.0.0.1";
    int port = 0;  // 0: any free port
    std::vector<uint8_t> secret;
    uint32_t world = 1;                     // ranks 0..world-1 may join
    std::vector<uint8_t> ucx_address;       // ours, sent to every peer that proves the secret
    std::chrono::milliseconds handshake_timeout{10000};  // per connection, from accept
    size_t max_pending = 64;                // handshakes in progress at once; more are refused
    Log log;                                // one line per refused peer
  };
  static Result<std::unique_ptr<BootstrapListener>> Listen(Options opts);
  ~BootstrapListener();
  BootstrapListener(const BootstrapListener&) = delete;
  BootstrapListener& operator=(const BootstrapListener&) = delete;

  int port() const { return port_; }
  // Runs every handshake in progress for at most `max_wait` and returns the first peer that proved
  // a rank not in `taken` (it has been answered kAuthOk), or nullopt when none did in time. A
  // peer proving a taken rank is refused alone. An error only when the listener itself fails.
  Result<std::optional<Joined>> Next(std::chrono::milliseconds max_wait,
                                     const std::vector<bool>& taken);

 private:
  struct Pending;
  BootstrapListener() = default;
  void AcceptAll();
  // Reads what `p` has sent; true when its handshake frame is complete. Sets `why` on failure.
  bool ReadFrom(Pending& p, std::string* why);
  // Closes pending handshake i; a non-empty `why` is logged and sent to the peer as a refusal.
  void Drop(size_t i, const std::string& why, StatusCode code = StatusCode::kInvalidArgument);

  Options opts_;
  int fd_ = -1;
  int port_ = 0;
  std::vector<std::unique_ptr<Pending>> pending_;
  std::chrono::steady_clock::time_point accept_paused_until_{};
};

// The worker's side: connects to host:port, proves `rank`, checks the coordinator's proof, and
// returns the coordinator's UCX address. Refusals and a coordinator that cannot prove the secret
// are errors; every step is bounded by `timeout`. kUnavailable when nobody listens (yet).
Result<std::vector<uint8_t>> JoinCluster(const std::string& host, int port, uint32_t rank,
                                         std::span<const uint8_t> secret,
                                         std::span<const uint8_t> ucx_address,
                                         std::chrono::milliseconds timeout);

// Resolves an IPv4 host name or literal (port in host byte order) for bind/connect.
Result<std::string> ResolveIpv4(const std::string& host);

}  // namespace gemma2::rpc
