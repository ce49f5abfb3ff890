// The control plane's transport: UCX stream endpoints (TCP or shared memory on one host, RDMA
// where the fabric has it) carrying the frames of rpc/wire.h. Every wait has a deadline; a peer
// that closes or dies turns into an error on the next send or receive, never a hang.
//
// Threading: a Channel and the UcxNode it came from belong to one thread (UCX single-thread mode).
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "common/status.h"
#include "rpc/wire.h"

namespace gemma2::rpc {

class UcxNode;

struct Received {
  MessageType type;
  std::vector<uint8_t> payload;
};

class Channel {
 public:
  ~Channel();
  Channel(const Channel&) = delete;
  Channel& operator=(const Channel&) = delete;

  Status Send(MessageType type, std::span<const uint8_t> payload, std::chrono::milliseconds timeout);
  // Bytes as they are, unframed: what a broken or hostile peer would send (tests use it).
  Status SendBytes(std::span<const uint8_t> bytes, std::chrono::milliseconds timeout);
  // The next frame, checked by ParseHeader; kDeadlineExceeded when none arrives in time.
  Result<Received> Receive(std::chrono::milliseconds timeout);
  // Non-blocking receive, to watch many channels at once through one node's progress:
  // StartReceive() posts it; Poll() advances it (true when a frame is complete; an error when the
  // peer failed or the frame is malformed); Take() hands the frame over.
  Status StartReceive();
  Result<bool> Poll();
  Received Take();
  // True once the peer closed or failed (also discovered by Send/Receive).
  bool broken() const;
  const std::string& peer() const { return peer_; }

 private:
  friend class UcxNode;

 public:
  struct State;  // shared with the UCX error callback

 private:
  Channel(UcxNode* node, std::shared_ptr<State> state, std::string peer);
  Status Wait(void* request, std::chrono::steady_clock::time_point deadline, const char* what);

  UcxNode* node_;
  std::shared_ptr<State> state_;
  std::string peer_;
  // The posted receive: header first, then payload.
  bool posted_ = false;
  void* pending_ = nullptr;
  bool in_payload_ = false;
  uint8_t header_[kHeaderBytes] = {};
  size_t got_ = 0;
  Received frame_{};
};

// One UCX context + worker. Listens (server side) or connects (client side).
class UcxNode {
 public:
  static Result<std::unique_ptr<UcxNode>> Create();
  ~UcxNode();
  UcxNode(const UcxNode&) = delete;
  UcxNode& operator=(const UcxNode&) = delete;

  // Listens on host:port (port 0: any); returns the port chosen.
  Result<int> Listen(const std::string& host, int port);
  // The next incoming connection, waiting at most `timeout`.
  Result<std::unique_ptr<Channel>> Accept(std::chrono::milliseconds timeout);
  // Creates the endpoint; the connection completes with the first exchange, whose own deadline
  // (Send/Receive) bounds the wait for an unreachable peer.
  Result<std::unique_ptr<Channel>> Connect(const std::string& host, int port);
  void Progress();
  // Progresses, and when nothing was pending sleeps until the worker has events or `max` passes
  // (the node's event descriptor): waiting costs no CPU, which matters when ranks share cores.
  void WaitForEvents(std::chrono::microseconds max);

  struct Impl;  // shared with the UCX connection callback

 private:
  UcxNode();
  std::unique_ptr<Impl> impl_;
  friend class Channel;
};

}  // namespace gemma2::rpc
