#include "collectives/nccl_collective.h"

#include <cuda_runtime.h>
#include <gloo/rendezvous/store.h>

#include <cstring>

#include "common/cuda_check.h"

GEMMA2_DEFINE_CHECK(ncclResult_t, ncclSuccess, ncclGetErrorString, "NCCL")

namespace gemma2 {
namespace {

using Clock = std::chrono::steady_clock;

Result<ncclDataType_t> NcclType(DType d) {
  switch (d) {
    case DType::kF32:
      return ncclFloat32;
    case DType::kBF16:
      return ncclBfloat16;
    case DType::kF16:
      return ncclFloat16;
    default:
      return Internal("NCCL: unsupported tensor dtype");
  }
}

}  // namespace

Result<std::unique_ptr<NcclCollective>> NcclCollective::Create(const NcclOptions& opts,
                                                               gloo::rendezvous::Store& store,
                                                               const std::string& key) {
  std::unique_ptr<NcclCollective> c(new NcclCollective(opts));
  RETURN_IF_CUDA_ERROR(cudaSetDevice(opts.device));
  ncclUniqueId id;
  try {
    if (opts.rank == 0) {
      RETURN_IF_CUDA_ERROR(ncclGetUniqueId(&id));
      store.set(key, std::vector<char>(id.internal, id.internal + sizeof(id.internal)));
    } else {
      const std::vector<char> v = store.get(key);
      if (v.size() != sizeof(id.internal))
        return Internal("NCCL " + opts.who + ": malformed unique id under " + key);
      std::memcpy(id.internal, v.data(), v.size());
    }
  } catch (const std::exception& e) {
    return Status(StatusCode::kUnavailable,
                  "NCCL " + opts.who + ": rendezvous '" + key + "': " + e.what());
  }
  // Non-blocking init, so a peer that never arrives is a timeout instead of a hang.
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  // In non-blocking mode the call answers ncclInProgress while the group forms.
  const ncclResult_t started = ncclCommInitRankConfig(&c->comm_, opts.size, id, opts.rank, &config);
  if (started != ncclInProgress) RETURN_IF_CUDA_ERROR(started);
  const auto deadline = Clock::now() + opts.init_timeout;
  ncclResult_t state = ncclInProgress;
  while (state == ncclInProgress) {
    RETURN_IF_CUDA_ERROR(ncclCommGetAsyncError(c->comm_, &state));
    if (state == ncclInProgress && Clock::now() > deadline) {
      c->Abort("initialization timed out");
      return Status(StatusCode::kDeadlineExceeded,
                    "NCCL " + opts.who + ": the group of " + std::to_string(opts.size) +
                        " did not form within " + std::to_string(opts.init_timeout.count()) +
                        " ms");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  RETURN_IF_CUDA_ERROR(state);
  c->watchdog_ = std::thread([p = c.get()] { p->Watch(); });
  return c;
}

NcclCollective::~NcclCollective() {
  {
    MutexLock lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (watchdog_.joinable()) watchdog_.join();
  MutexLock lock(mu_);
  if (comm_ && !aborted_) ncclCommDestroy(comm_);
}

void NcclCollective::Abort(const std::string& why) {
  MutexLock lock(mu_);
  if (aborted_ || !comm_) return;
  aborted_ = true;
  why_ = why;
  ncclCommAbort(comm_);
}

Status NcclCollective::Usable() const {
  MutexLock lock(mu_);
  if (aborted_)
    return Status(StatusCode::kUnavailable,
                  "NCCL " + opts_.who + ": communicator aborted: " + why_);
  return OkStatus();
}

void NcclCollective::Arm(std::chrono::milliseconds timeout) {
  MutexLock lock(mu_);
  armed_ = true;
  deadline_ = Clock::now() + timeout;
}

void NcclCollective::Disarm() {
  MutexLock lock(mu_);
  armed_ = false;
}

void NcclCollective::Watch() {
  MutexLock lock(mu_);
  while (!stop_ && !aborted_) {
    cv_.wait_for(mu_, std::chrono::milliseconds(100));
    if (stop_ || aborted_) break;
    ncclResult_t state = ncclSuccess;
    ncclCommGetAsyncError(comm_, &state);
    std::string why;
    if (state != ncclSuccess && state != ncclInProgress)
      why = std::string("asynchronous error: ") + ncclGetErrorString(state);
    if (armed_ && Clock::now() > deadline_)
      why = "a step ran past its deadline (a peer hung or died)";
    if (!why.empty()) {
      aborted_ = true;
      why_ = why;
      ncclCommAbort(comm_);  // releases kernels waiting on the peers; the stream's sync returns
    }
  }
}

Status NcclCollective::Settle(ncclResult_t r, const char* what) {
  while (r == ncclInProgress) {
    std::this_thread::yield();
    MutexLock lock(mu_);
    if (aborted_) break;  // the watchdog gave up on it: Usable() says why
    ncclCommGetAsyncError(comm_, &r);
  }
  RETURN_IF_ERROR(Usable());
  if (r != ncclSuccess) {
    return Status(StatusCode::kUnavailable, "NCCL " + opts_.who + ": " + what + ": " +
                                                ncclGetErrorString(r) + " (" +
                                                ncclGetLastError(comm_) + ")");
  }
  return OkStatus();
}

Status NcclCollective::AllReduceSum(Tensor& t) {
  if (t.numel() == 0) return OkStatus();  // a group of one still goes through NCCL (a no-op there)
  RETURN_IF_ERROR(Usable());
  ASSIGN_OR_RETURN(ncclDataType_t type, NcclType(t.dtype));
  return Settle(ncclAllReduce(t.data, t.data, static_cast<size_t>(t.numel()), type, ncclSum, comm_,
                              static_cast<cudaStream_t>(opts_.stream)),
                "ncclAllReduce");
}

Status NcclCollective::SendTo(const Tensor& t, int peer) {
  RETURN_IF_ERROR(Usable());
  ASSIGN_OR_RETURN(ncclDataType_t type, NcclType(t.dtype));
  return Settle(ncclSend(t.data, static_cast<size_t>(t.numel()), type, peer, comm_,
                         static_cast<cudaStream_t>(opts_.stream)),
                "ncclSend");
}

Status NcclCollective::RecvFrom(Tensor& t, int peer) {
  RETURN_IF_ERROR(Usable());
  ASSIGN_OR_RETURN(ncclDataType_t type, NcclType(t.dtype));
  return Settle(ncclRecv(t.data, static_cast<size_t>(t.numel()), type, peer, comm_,
                         static_cast<cudaStream_t>(opts_.stream)),
                "ncclRecv");
}

}  // namespace gemma2
