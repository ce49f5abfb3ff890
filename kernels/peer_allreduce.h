// The sum across tensor-parallel ranks of one host fused with Gemma's post-norm, residual add and
// next pre-norm: a one-shot all-reduce over CUDA IPC buffers (NVLink), for decode-sized steps
// where NCCL's latency per call is most of the time. Twin of a sum across ranks followed by
// AddRmsNorm (kernels/rms_norm.h); the sum runs in fp32 in rank order and is rounded to bf16 once,
// so every rank computes the same bits (for two ranks the same bits as NCCL's bf16 sum).
#pragma once

#include "kernels/types.h"

namespace gemma2::kernels {

inline constexpr int kMaxPeers = 8;

// The group as the kernel sees it. Every rank's inbox and flags are mapped into every rank.
struct PeerGroupView {
  int rank = 0, size = 0;
  int64_t max_rows = 0, hidden = 0;
  // inbox[k]: rank k's [2 parities][size sources][max_rows][hidden] bf16.
  bf16* inbox[kMaxPeers] = {};
  // flags[k]: rank k's [max_rows][kMaxPeers] arrival counters, written by the sources.
  uint32_t* flags[kMaxPeers] = {};
  // This rank's calls so far per row block (device memory, so graph replays advance it too).
  uint32_t* calls = nullptr;
};

// Bytes of one rank's inbox and of its flags, for `size` ranks.
size_t PeerInboxBytes(int size, int64_t max_rows, int64_t hidden);
size_t PeerFlagBytes(int64_t max_rows);

// delta_all = bf16(sum over ranks of delta), then AddRmsNorm(residual, delta_all, post_w, next_w)
// on `rows` <= max_rows rows of `hidden` (a multiple of 8). Every rank of the group must make the
// same calls in the same order. A peer that does not arrive within timeout_ns ends the kernel
// with a trap (a sticky error the step reports) instead of a hang.
cudaError_t PeerAllReduceAddRmsNorm(const PeerGroupView& g, bf16* residual, const bf16* delta,
                                    const bf16* post_w, const bf16* next_w, int64_t rows, float eps,
                                    bf16* normed, uint64_t timeout_ns, cudaStream_t stream);

}  // namespace gemma2::kernels
