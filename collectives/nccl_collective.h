// The Collective of GPU ranks: NCCL on the backend's stream. One communicator per group (a
// stage's tensor-parallel ranks, or a 2-rank pipeline link), created from a unique id that rank 0
// of the group publishes through the rendezvous store (the coordinator's, over the control plane).
//
// Operations are stream-ordered and return at once (they may be captured into CUDA graphs); their
// failures surface in the next synchronizing call of the backend. A watchdog thread turns a hang
// into an error: it polls ncclCommGetAsyncError, and aborts the communicator (ncclCommAbort) when
// NCCL reports an error or when a step armed with Arm() is still running past its deadline.
// Abort is idempotent; after it every operation fails with the reason.
//
// Every cuda worker uses one (a group of one too: the same path); TP 2 measured on two H200s in
// bench/results/2026-11-29-27b-h200x2-*.
#pragma once

#include <nccl.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <string>
#include <thread>

#include "collectives/collective.h"
#include "common/mutex.h"

namespace gloo::rendezvous {
class Store;
}

namespace gemma2 {

struct NcclOptions {
  int rank = 0, size = 1;
  int device = 0;
  void* stream = nullptr;  // cudaStream_t of the backend
  std::chrono::milliseconds init_timeout{120000};
  std::string who;  // "rank 3 (stage 1, tp 1)" for messages
};

class NcclCollective final : public Collective {
 public:
  // Rank 0 makes the unique id and stores it under `key`; the others read it (blocking).
  static Result<std::unique_ptr<NcclCollective>> Create(const NcclOptions& opts,
                                                        gloo::rendezvous::Store& store,
                                                        const std::string& key);
  ~NcclCollective() override;
  NcclCollective(const NcclCollective&) = delete;
  NcclCollective& operator=(const NcclCollective&) = delete;

  int rank() const override { return opts_.rank; }
  int size() const override { return opts_.size; }
  Status AllReduceSum(Tensor& t) override;  // bf16 or fp32 device tensors, in place
  Status SendTo(const Tensor& t, int peer) override;
  Status RecvFrom(Tensor& t, int peer) override;

  // The step watchdog: from Arm until Disarm the communicator is aborted if `deadline` passes.
  void Arm(std::chrono::milliseconds timeout) EXCLUDES(mu_);
  void Disarm() EXCLUDES(mu_);
  // Idempotent; frees the communicator's resources and releases kernels stuck in it.
  void Abort(const std::string& why) EXCLUDES(mu_);

 private:
  explicit NcclCollective(const NcclOptions& o) : opts_(o) {}
  Status Usable() const EXCLUDES(mu_);
  // A non-blocking communicator may answer a call with ncclInProgress: waits until NCCL settles
  // it (or the watchdog aborts), then turns the outcome into a Status naming `what`.
  Status Settle(ncclResult_t r, const char* what) EXCLUDES(mu_);
  void Watch() EXCLUDES(mu_);

  NcclOptions opts_;
  ncclComm_t comm_ = nullptr;
  // Shared by the rank's step thread and the watchdog.
  mutable Mutex mu_;
  std::condition_variable_any cv_;  // stop_ set
  bool aborted_ GUARDED_BY(mu_) = false;
  bool stop_ GUARDED_BY(mu_) = false;
  std::string why_ GUARDED_BY(mu_);
  std::chrono::steady_clock::time_point deadline_ GUARDED_BY(mu_){};
  bool armed_ GUARDED_BY(mu_) = false;
  std::thread watchdog_;
};

}  // namespace gemma2
