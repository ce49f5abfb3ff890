#include "rpc/ucx_channel.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <poll.h>
#include <ucp/api/ucp.h>

#include <cstring>
#include <deque>

namespace gemma2::rpc {
namespace {

using Clock = std::chrono::steady_clock;

Status UcxError(const std::string& what, ucs_status_t st) {
  return Status(StatusCode::kUnavailable, what + ": " + ucs_status_string(st));
}

Result<sockaddr_in> Resolve(const std::string& host, int port) {
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  if (inet_pton(AF_INET, host.c_str(), &a.sin_addr) == 1) return a;
  addrinfo hints{}, *res = nullptr;
  hints.ai_family = AF_INET;
  if (getaddrinfo(host.c_str(), nullptr, &hints, &res) != 0 || res == nullptr) {
    return InvalidArgument("cannot resolve host '" + host + "'");
  }
  a.sin_addr = reinterpret_cast<sockaddr_in*>(res->ai_addr)->sin_addr;
  freeaddrinfo(res);
  return a;
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
  ucp_listener_h listener = nullptr;
  std::deque<ucp_conn_request_h> pending;
  int event_fd = -1;  // readable when the worker has something to progress
};

namespace {

void OnConnRequest(ucp_conn_request_h request, void* arg) {
  static_cast<UcxNode::Impl*>(arg)->pending.push_back(request);
}

void OnEpError(void* arg, ucp_ep_h, ucs_status_t status) {
  auto* st = static_cast<Channel::State*>(arg);
  st->broken = true;
  st->error = ucs_status_string(status);
}

}  // namespace

UcxNode::UcxNode() : impl_(std::make_unique<Impl>()) {}

UcxNode::~UcxNode() {
  if (impl_->listener) {
    for (auto r : impl_->pending) ucp_listener_reject(impl_->listener, r);  // before the listener goes
    ucp_listener_destroy(impl_->listener);
  }
  if (impl_->worker) ucp_worker_destroy(impl_->worker);
  if (impl_->context) ucp_cleanup(impl_->context);
}

Result<std::unique_ptr<UcxNode>> UcxNode::Create() {
  std::unique_ptr<UcxNode> n(new UcxNode());
  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES;
  params.features = UCP_FEATURE_STREAM | UCP_FEATURE_WAKEUP;
  ucp_config_t* cfg = nullptr;
  ucs_status_t st = ucp_config_read(nullptr, nullptr, &cfg);
  if (st != UCS_OK) return UcxError("reading the UCX configuration", st);
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
  return n;
}

void UcxNode::Progress() { ucp_worker_progress(impl_->worker); }

void UcxNode::WaitForEvents(std::chrono::microseconds max) {
  if (ucp_worker_progress(impl_->worker) != 0) return;
  const ucs_status_t st = ucp_worker_arm(impl_->worker);
  if (st == UCS_ERR_BUSY) return;  // events arrived meanwhile: progress them
  if (st != UCS_OK) {
    usleep(static_cast<useconds_t>(std::min<int64_t>(max.count(), 100)));
    return;
  }
  pollfd pfd{impl_->event_fd, POLLIN, 0};
  const timespec ts{static_cast<time_t>(max.count() / 1000000), static_cast<long>((max.count() % 1000000) * 1000)};
  ppoll(&pfd, 1, &ts, nullptr);
}

Result<int> UcxNode::Listen(const std::string& host, int port) {
  ASSIGN_OR_RETURN(sockaddr_in addr, Resolve(host, port));
  ucp_listener_params_t lp{};
  lp.field_mask = UCP_LISTENER_PARAM_FIELD_SOCK_ADDR | UCP_LISTENER_PARAM_FIELD_CONN_HANDLER;
  lp.sockaddr.addr = reinterpret_cast<const sockaddr*>(&addr);
  lp.sockaddr.addrlen = sizeof(addr);
  lp.conn_handler.cb = OnConnRequest;
  lp.conn_handler.arg = impl_.get();
  const ucs_status_t st = ucp_listener_create(impl_->worker, &lp, &impl_->listener);
  if (st != UCS_OK) {
    return UcxError("listening on " + host + ":" + std::to_string(port), st);
  }
  ucp_listener_attr_t attr{};
  attr.field_mask = UCP_LISTENER_ATTR_FIELD_SOCKADDR;
  ucp_listener_query(impl_->listener, &attr);
  return static_cast<int>(ntohs(reinterpret_cast<sockaddr_in*>(&attr.sockaddr)->sin_port));
}

Result<std::unique_ptr<Channel>> UcxNode::Accept(std::chrono::milliseconds timeout) {
  const auto deadline = Clock::now() + timeout;
  while (impl_->pending.empty()) {
    if (Clock::now() > deadline) return Status(StatusCode::kDeadlineExceeded, "no connection arrived in time");
    WaitForEvents(std::chrono::milliseconds(1));
  }
  ucp_conn_request_h req = impl_->pending.front();
  impl_->pending.pop_front();
  ucp_conn_request_attr_t ra{};
  ra.field_mask = UCP_CONN_REQUEST_ATTR_FIELD_CLIENT_ADDR;
  std::string peer = "?";
  if (ucp_conn_request_query(req, &ra) == UCS_OK) {
    char buf[64];
    const auto* sin = reinterpret_cast<const sockaddr_in*>(&ra.client_address);
    peer = std::string(inet_ntop(AF_INET, &sin->sin_addr, buf, sizeof(buf))) + ":" +
           std::to_string(ntohs(sin->sin_port));
  }
  auto state = std::make_shared<Channel::State>();
  ucp_ep_params_t ep{};
  ep.field_mask = UCP_EP_PARAM_FIELD_CONN_REQUEST | UCP_EP_PARAM_FIELD_ERR_HANDLER |
                  UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
  ep.conn_request = req;
  ep.err_mode = UCP_ERR_HANDLING_MODE_PEER;
  ep.err_handler.cb = OnEpError;
  ep.err_handler.arg = state.get();
  const ucs_status_t st = ucp_ep_create(impl_->worker, &ep, &state->ep);
  if (st != UCS_OK) return UcxError("accepting a connection from " + peer, st);
  return std::unique_ptr<Channel>(new Channel(this, state, peer));
}

Result<std::unique_ptr<Channel>> UcxNode::Connect(const std::string& host, int port) {
  ASSIGN_OR_RETURN(sockaddr_in addr, Resolve(host, port));
  auto state = std::make_shared<Channel::State>();
  ucp_ep_params_t ep{};
  ep.field_mask = UCP_EP_PARAM_FIELD_FLAGS | UCP_EP_PARAM_FIELD_SOCK_ADDR |
                  UCP_EP_PARAM_FIELD_ERR_HANDLER | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
  ep.flags = UCP_EP_PARAMS_FLAGS_CLIENT_SERVER;
  ep.sockaddr.addr = reinterpret_cast<const sockaddr*>(&addr);
  ep.sockaddr.addrlen = sizeof(addr);
  ep.err_mode = UCP_ERR_HANDLING_MODE_PEER;
  ep.err_handler.cb = OnEpError;
  ep.err_handler.arg = state.get();
  const std::string peer = host + ":" + std::to_string(port);
  const ucs_status_t st = ucp_ep_create(impl_->worker, &ep, &state->ep);
  if (st != UCS_OK) return UcxError("connecting to " + peer, st);
  return std::unique_ptr<Channel>(new Channel(this, state, peer));
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
  return SendBytes(Frame(type, payload), timeout);
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
  ucp_request_param_t p{};
  p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
  p.flags = UCP_STREAM_RECV_FLAG_WAITALL;
  pending_ = ucp_stream_recv_nbx(state_->ep, header_, sizeof(header_), &got_, &p);
  if (UCS_PTR_IS_ERR(pending_)) {
    state_->broken = true;
    return UcxError("receiving from " + peer_, UCS_PTR_STATUS(pending_));
  }
  return OkStatus();
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
    if (in_payload_) return true;
    auto h = ParseHeader(header_);
    if (!h.ok()) {
      state_->broken = true;
      return h.status().WithContext("from " + peer_);
    }
    frame_ = Received{h->type, std::vector<uint8_t>(h->payload_bytes)};
    in_payload_ = true;
    if (frame_.payload.empty()) return true;
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
  uint8_t header[kHeaderBytes];
  RETURN_IF_ERROR(read_exact(header, sizeof(header)));
  auto h = ParseHeader(header);
  if (!h.ok()) {
    state_->broken = true;  // the stream can no longer be trusted: close it
    return h.status().WithContext("from " + peer_);
  }
  Received r{h->type, std::vector<uint8_t>(h->payload_bytes)};
  RETURN_IF_ERROR(read_exact(r.payload.data(), r.payload.size()));
  return r;
}

}  // namespace gemma2::rpc
