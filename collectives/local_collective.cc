#include "collectives/local_collective.h"

namespace gemma2 {

Status LocalCollective::AllReduceSum(Tensor& t) {
  LocalGroup& g = *group_;
  if (t.dtype != DType::kF32) return Internal("LocalCollective: fp32 tensors only");
  const int64_t n = t.numel();
  g.slots_[static_cast<size_t>(rank_)] = t.as<float>();
  if (rank_ == 0) g.sum_.assign(static_cast<size_t>(n), 0.0f);
  g.barrier_.arrive_and_wait();
  // Each rank sums its own chunk over all ranks, in rank order.
  const int64_t chunk = (n + g.size_ - 1) / g.size_;
  const int64_t lo = std::min(n, rank_ * chunk), hi = std::min(n, lo + chunk);
  for (int r = 0; r < g.size_; ++r) {
    const float* src = g.slots_[static_cast<size_t>(r)];
    for (int64_t i = lo; i < hi; ++i) g.sum_[static_cast<size_t>(i)] += src[i];
  }
  g.barrier_.arrive_and_wait();
  std::copy(g.sum_.begin(), g.sum_.end(), t.as<float>());
  g.barrier_.arrive_and_wait();  // nobody reuses sum_ until all have copied
  return OkStatus();
}

}  // namespace gemma2
