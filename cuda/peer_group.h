// The CUDA IPC buffers of a tensor-parallel group whose ranks share one host, for the fused
// one-shot all-reduce (kernels/peer_allreduce.h). RAII: frees its own buffers and closes the
// peers' mappings. All or nothing: every rank learns whether every rank mapped every peer.
#pragma once

#include <memory>
#include <vector>

#include "common/status.h"
#include "kernels/peer_allreduce.h"
#include "model/backend.h"

namespace gemma2 {

class PeerGroup {
 public:
  // kUnavailable (on every rank alike) when some rank is on another host or could not map the
  // others: the caller then keeps NCCL. Other errors are this rank's own (out of memory...).
  static Result<std::unique_ptr<PeerGroup>> Create(int rank, int size, int64_t max_rows,
                                                   int64_t hidden, const PeerExchange& exchange);
  ~PeerGroup();
  PeerGroup(const PeerGroup&) = delete;
  PeerGroup& operator=(const PeerGroup&) = delete;

  const kernels::PeerGroupView& view() const { return view_; }

 private:
  PeerGroup() = default;
  kernels::PeerGroupView view_;
  void* own_ = nullptr;        // this rank's inbox + flags, one allocation
  std::vector<void*> opened_;  // the peers' allocations mapped here
};

}  // namespace gemma2
