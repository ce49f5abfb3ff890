// The control plane's transport: UCX stream endpoints (TCP or shared memory on one host, RDMA
// where the fabric has it) carrying the frames of rpc/wire.h. Every wait has a deadline; a peer
// that closes or dies turns into an error on the next send or receive, never a hang.
//
// Threading: a Channel and the UcxNode it came from belong to one thread (UCX single-thread mode).
#pragma once

#include <algorithm>
#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "common/status.h"
#include "rpc/wire.h"

namespace gemma2::rpc {

class UcxNode;

class Channel {
 public:
  ~Channel();
  Channel(const Channel&) = delete;
  Channel& operator=(const Channel&) = delete;

  // A payload over kMaxPayload goes as kPart frames and a last frame of `type`; the receiver
  // reassembles it (up to what it expects, ExpectUpTo).
  Status Send(MessageType type, std::span<const uint8_t> payload, std::chrono::milliseconds timeout);
  // The largest payload the next message in pieces may have; it falls back to kMaxPayload once
  // that message is whole (a peer cannot make this process allocate more than it expects).
  void ExpectUpTo(size_t bytes) { expect_up_to_ = std::max<size_t>(bytes, kMaxPayload); }
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
  // Gives up on a peer that stopped answering: nothing more is sent, and closing does not wait.
  void Abandon(const std::string& why);
  const std::string& peer() const { return peer_; }

 private:
  friend class UcxNode;

 public:
  struct State;  // shared with the UCX error callback

 private:
  Channel(UcxNode* node, std::shared_ptr<State> state, std::string peer);
  Status Wait(void* request, std::chrono::steady_clock::time_point deadline, const char* what);
  void* PostHeaderReceive();  // the next frame's header into header_ (a UCX request or null)
  // Takes a complete frame: a kPart piece is kept (false); the frame that ends a message gets the
  // pieces in front of its payload (true). An error when the pieces outgrow expect_up_to_.
  Result<bool> Assemble(Received& frame);

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
  std::vector<uint8_t> pieces_;  // kPart payloads of the message being received
  size_t expect_up_to_ = kMaxPayload;
};

// One UCX context + worker. UCX never listens on a socket address here: peers first meet over
// the authenticated bootstrap (rpc/bootstrap.h), exchange worker addresses there, and each side
// connects an endpoint to the other's address (UCX pairs the two).
class UcxNode {
 public:
  // `bind_host`: the cluster's address on this node; UCX's network transports are confined to the
  // interface that holds it (unless UCX_NET_DEVICES says otherwise). Empty or 0.0.0.0: any.
  static Result<std::unique_ptr<UcxNode>> Create(const std::string& bind_host = "127.0.0.1");
  ~UcxNode();
  UcxNode(const UcxNode&) = delete;
  UcxNode& operator=(const UcxNode&) = delete;

  // This worker's address, to hand to a peer over the bootstrap.
  const std::vector<uint8_t>& address() const;
  // An endpoint to the peer whose worker address is `address` (the peer connects to ours too);
  // the connection completes with the first exchange, whose own deadline (Send/Receive) bounds
  // the wait for an unreachable peer. `peer` names it in errors.
  Result<std::unique_ptr<Channel>> ConnectTo(std::span<const uint8_t> address, std::string peer);
  void Progress();
  // Progresses, and when nothing was pending sleeps until the worker has events, `also` (another
  // descriptor, -1: none) is readable, or `max` passes: waiting costs no CPU, which matters when
  // ranks share cores.
  void WaitForEvents(std::chrono::microseconds max, int also = -1);

  struct Impl;  // shared with the UCX connection callback

 private:
  UcxNode();
  std::unique_ptr<Impl> impl_;
  friend class Channel;
};

}  // namespace gemma2::rpc
