#include "rpc/ucx_channel.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <ifaddrs.h>
#include <poll.h>
#include <ucp/api/ucp.h>

#include <cstdlib>
#include <cstring>

#include "rpc/bootstrap.h"

namespace gemma2::rpc {
namespace {

using Clock = std::chrono::steady_clock;

Status UcxError(const std::string& what, ucs_status_t st) {
  return Status(StatusCode::kUnavailable, what + ": " + ucs_status_string(st));
}

// The name of the interface holding IPv4 address `ip` ("" when none does).
std::string InterfaceOf(const std::string& ip) {
  in_addr want{};
  if (inet_pton(AF_INET, ip.c_str(), &want) != 1) return "";
  ifaddrs* all = nullptr;
  if (getifaddrs(&all) != 0) return "";
  std::string name;
  for (ifaddrs* i = all; i != nullptr; i = i->ifa_next) {
    if (i->ifa_addr == nullptr || i->ifa_addr->sa_family != AF_INET) continue;
    if (reinterpret_cast<sockaddr_in*>(i->ifa_addr)->sin_addr.s_addr == want.s_addr) {
      name = i->ifa_name;
      break;
    }
  }
  freeifaddrs(all);
  return name;
}

}  // namespace

struct Channel::State {
  ucp_ep_h ep = nullptr;
  bool broken = false;
  std::string error;
};

struct UcxNode::Impl {
  ucp_context_h context = nullptr;
  ucp_worker_h worker = nullptr;
  std::vector<uint8_t> address;
  int event_fd = -1;  // readable when the worker has something to progress
};

namespace {

void OnEpError(void* arg, ucp_ep_h, ucs_status_t status) {
  auto* st = static_cast<Channel::State*>(arg);
  st->broken = true;
  st->error = ucs_status_string(status);
}

}  // namespace

UcxNode::UcxNode() : impl_(std::make_unique<Impl>()) {}

UcxNode::~UcxNode() {
  if (impl_->worker) ucp_worker_destroy(impl_->worker);
  if (impl_->context) ucp_cleanup(impl_->context);
}

Result<std::unique_ptr<UcxNode>> UcxNode::Create(const std::string& bind_host) {
  std::unique_ptr<UcxNode> n(new UcxNode());
  std::string dev;
  if (!bind_host.empty() && bind_host != "0.0.0.0" && std::getenv("UCX_NET_DEVICES") == nullptr) {
    ASSIGN_OR_RETURN(const std::string ip, ResolveIpv4(bind_host));
    dev = InterfaceOf(ip);
    if (dev.empty()) return InvalidArgument("no network interface of this host has the address " + ip);
  }
  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES;
  params.features = UCP_FEATURE_STREAM | UCP_FEATURE_WAKEUP;
  ucp_config_t* cfg = nullptr;
  ucs_status_t st = ucp_config_read(nullptr, nullptr, &cfg);
  if (st != UCS_OK) return UcxError("reading the UCX configuration", st);
  // UCX's TCP transport listens on every interface it uses: keep it to the cluster's own.
  if (!dev.empty()) {
    st = ucp_config_modify(cfg, "NET_DEVICES", dev.c_str());
    if (st != UCS_OK) {
      ucp_config_release(cfg);
      return UcxError("confining UCX to " + dev, st);
    }
  }
  st = ucp_init(&params, cfg, &n->impl_->context);
  ucp_config_release(cfg);
  if (st != UCS_OK) return UcxError("initializing UCX", st);
  ucp_worker_params_t wp{};
  wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  wp.thread_mode = UCS_THREAD_MODE_SINGLE;
  st = ucp_worker_create(n->impl_->context, &wp, &n->impl_->worker);
  if (st != UCS_OK) return UcxError("creating a UCX worker", st);
  st = ucp_worker_get_efd(n->impl_->worker, &n->impl_->event_fd);
  if (st != UCS_OK) return UcxError("getting the UCX worker's event descriptor", st);
  // UCX opens descriptors of its own (the event fd, transport sockets): none may leak into the
  // processes this one starts.
  fcntl(n->impl_->event_fd, F_SETFD, FD_CLOEXEC);
  ucp_address_t* addr = nullptr;
  size_t len = 0;
  st = ucp_worker_get_address(n->impl_->worker, &addr, &len);
  if (st != UCS_OK) return UcxError("getting the UCX worker's address", st);
  const auto* bytes = reinterpret_cast<const uint8_t*>(addr);
  n->impl_->address.assign(bytes, bytes + len);
  ucp_worker_release_address(n->impl_->worker, addr);
  return n;
}

void UcxNode::Progress() { ucp_worker_progress(impl_->worker); }

void UcxNode::WaitForEvents(std::chrono::microseconds max, int also) {
  if (ucp_worker_progress(impl_->worker) != 0) return;
  const ucs_status_t st = ucp_worker_arm(impl_->worker);
  if (st == UCS_ERR_BUSY) return;  // events arrived meanwhile: progress them
  if (st != UCS_OK) {
    usleep(static_cast<useconds_t>(std::min<int64_t>(max.count(), 100)));
    return;
  }
  pollfd pfd[2] = {{impl_->event_fd, POLLIN, 0}, {also, POLLIN, 0}};
  const timespec ts{static_cast<time_t>(max.count() / 1000000), static_cast<long>((max.count() % 1000000) * 1000)};
  ppoll(pfd, also >= 0 ? 2 : 1, &ts, nullptr);
}

const std::vector<uint8_t>& UcxNode::address() const { return impl_->address; }

Result<std::unique_ptr<Channel>> UcxNode::ConnectTo(std::span<const uint8_t> address,
                                                   std::string peer) {
  auto state = std::make_shared<Channel::State>();
  ucp_ep_params_t ep{};
  ep.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLER |
                  UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
  ep.address = reinterpret_cast<const ucp_address_t*>(address.data());
  ep.err_mode = UCP_ERR_HANDLING_MODE_PEER;
  ep.err_handler.cb = OnEpError;
  ep.err_handler.arg = state.get();
  const ucs_status_t st = ucp_ep_create(impl_->worker, &ep, &state->ep);
  if (st != UCS_OK) return UcxError("connecting to " + peer, st);
  return std::unique_ptr<Channel>(new Channel(this, state, std::move(peer)));
}

Channel::Channel(UcxNode* node, std::shared_ptr<State> state, std::string peer)
    : node_(node), state_(std::move(state)), peer_(std::move(peer)) {}

Channel::~Channel() {
  if (pending_ != nullptr) {
    ucp_request_cancel(node_->impl_->worker, pending_);
    ucp_request_free(pending_);
  }
  if (state_->ep) {
    // Flush what was sent (a broken endpoint is closed by force), waiting at most 2 s.
    ucp_request_param_t p{};
    if (state_->broken) {
      p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
      p.flags = UCP_EP_CLOSE_FLAG_FORCE;
    }
    void* req = ucp_ep_close_nbx(state_->ep, &p);
    (void)Wait(req, Clock::now() + std::chrono::seconds(2), "closing");
  }
}

bool Channel::broken() const { return state_->broken; }

void Channel::Abandon(const std::string& why) {
  state_->broken = true;
  state_->error = why;
}

Status Channel::Wait(void* request, Clock::time_point deadline, const char* what) {
  if (request == nullptr) return OkStatus();
  if (UCS_PTR_IS_ERR(request)) {
    state_->broken = true;
    return UcxError(std::string(what) + " " + peer_, UCS_PTR_STATUS(request));
  }
  ucs_status_t st;
  while ((st = ucp_request_check_status(request)) == UCS_INPROGRESS) {
    if (state_->broken || Clock::now() > deadline) {
      // Cancel, give the cancellation a moment, then let UCX release the request whenever it
      // completes (some requests, such as a close, cannot be cancelled).
      ucp_request_cancel(node_->impl_->worker, request);
      const auto grace = Clock::now() + std::chrono::milliseconds(200);
      while (ucp_request_check_status(request) == UCS_INPROGRESS && Clock::now() < grace) {
        node_->Progress();
      }
      ucp_request_free(request);
      if (state_->broken) {
        return Status(StatusCode::kUnavailable, std::string(what) + " " + peer_ + ": connection lost (" + state_->error + ")");
      }
      return Status(StatusCode::kDeadlineExceeded, std::string(what) + " " + peer_ + ": timed out");
    }
    node_->WaitForEvents(std::chrono::milliseconds(1));
  }
  ucp_request_free(request);
  if (st != UCS_OK) {
    state_->broken = true;
    return UcxError(std::string(what) + " " + peer_, st);
  }
  return OkStatus();
}

Status Channel::Send(MessageType type, std::span<const uint8_t> payload,
                     std::chrono::milliseconds timeout) {
  while (payload.size() > kMaxPayload) {
    RETURN_IF_ERROR(SendBytes(Frame(MessageType::kPart, payload.first(kMaxPayload)), timeout));
    payload = payload.subspan(kMaxPayload);
  }
  return SendBytes(Frame(type, payload), timeout);
}

Result<bool> Channel::Assemble(Received& frame) {
  if (frame.type != MessageType::kPart && pieces_.empty()) return true;
  if (pieces_.size() + frame.payload.size() > expect_up_to_) {
    state_->broken = true;  // the stream can no longer be trusted
    return Status(StatusCode::kInvalidArgument,
                  "a message from " + peer_ + " in pieces grew past the " +
                      std::to_string(expect_up_to_) + " bytes expected");
  }
  pieces_.insert(pieces_.end(), frame.payload.begin(), frame.payload.end());
  if (frame.type == MessageType::kPart) return false;
  frame.payload = std::move(pieces_);
  pieces_.clear();
  expect_up_to_ = kMaxPayload;  // an allowance for one message in pieces
  return true;
}

Status Channel::SendBytes(std::span<const uint8_t> bytes, std::chrono::milliseconds timeout) {
  if (state_->broken) return Status(StatusCode::kUnavailable, "sending to " + peer_ + ": connection lost");
  ucp_request_param_t p{};
  void* req = ucp_stream_send_nbx(state_->ep, bytes.data(), bytes.size(), &p);
  return Wait(req, Clock::now() + timeout, "sending to");
}

Status Channel::StartReceive() {
  if (posted_) return OkStatus();  // already waiting for the next frame
  if (state_->broken) return Status(StatusCode::kUnavailable, "receiving from " + peer_ + ": connection lost");
  posted_ = true;
  in_payload_ = false;
  pending_ = PostHeaderReceive();
  if (UCS_PTR_IS_ERR(pending_)) {
    state_->broken = true;
    return UcxError("receiving from " + peer_, UCS_PTR_STATUS(pending_));
  }
  return OkStatus();
}

void* Channel::PostHeaderReceive() {
  ucp_request_param_t p{};
  p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
  p.flags = UCP_STREAM_RECV_FLAG_WAITALL;
  return ucp_stream_recv_nbx(state_->ep, header_, sizeof(header_), &got_, &p);
}

Result<bool> Channel::Poll() {
  node_->Progress();
  while (true) {
    if (pending_ != nullptr) {
      const ucs_status_t st = ucp_request_check_status(pending_);
      if (st == UCS_INPROGRESS) {
        if (state_->broken) {
          return Status(StatusCode::kUnavailable, "receiving from " + peer_ + ": connection lost (" + state_->error + ")");
        }
        return false;
      }
      ucp_request_free(pending_);
      pending_ = nullptr;
      if (st != UCS_OK) {
        state_->broken = true;
        return UcxError("receiving from " + peer_, st);
      }
    }
    if (in_payload_) {
      ASSIGN_OR_RETURN(const bool whole, Assemble(frame_));
      if (whole) return true;
      // A piece: receive the next frame's header.
      in_payload_ = false;
      pending_ = PostHeaderReceive();
      if (UCS_PTR_IS_ERR(pending_)) {
        state_->broken = true;
        return UcxError("receiving from " + peer_, UCS_PTR_STATUS(pending_));
      }
      continue;
    }
    auto h = ParseHeader(header_);
    if (!h.ok()) {
      state_->broken = true;
      return h.status().WithContext("from " + peer_);
    }
    frame_ = Received{h->type, std::vector<uint8_t>(h->payload_bytes)};
    in_payload_ = true;
    if (frame_.payload.empty()) continue;  // complete: assembled above
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    p.flags = UCP_STREAM_RECV_FLAG_WAITALL;
    pending_ = ucp_stream_recv_nbx(state_->ep, frame_.payload.data(), frame_.payload.size(), &got_, &p);
    if (UCS_PTR_IS_ERR(pending_)) {
      state_->broken = true;
      return UcxError("receiving from " + peer_, UCS_PTR_STATUS(pending_));
    }
  }
}

Received Channel::Take() {
  posted_ = false;
  return std::move(frame_);
}

Result<Received> Channel::Receive(std::chrono::milliseconds timeout) {
  const auto deadline = Clock::now() + timeout;
  auto read_exact = [&](uint8_t* buf, size_t n) -> Status {
    if (n == 0) return OkStatus();
    if (state_->broken) return Status(StatusCode::kUnavailable, "receiving from " + peer_ + ": connection lost");
    size_t got = 0;
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    p.flags = UCP_STREAM_RECV_FLAG_WAITALL;
    void* req = ucp_stream_recv_nbx(state_->ep, buf, n, &got, &p);
    return Wait(req, deadline, "receiving from");
  };
  while (true) {
    uint8_t header[kHeaderBytes];
    RETURN_IF_ERROR(read_exact(header, sizeof(header)));
    auto h = ParseHeader(header);
    if (!h.ok()) {
      state_->broken = true;  // the stream can no longer be trusted: close it
      return h.status().WithContext("from " + peer_);
    }
    Received r{h->type, std::vector<uint8_t>(h->payload_bytes)};
    RETURN_IF_ERROR(read_exact(r.payload.data(), r.payload.size()));
    ASSIGN_OR_RETURN(const bool whole, Assemble(r));
    if (whole) return r;
  }
}

}  // namespace gemma2::rpc
