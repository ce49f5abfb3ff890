// Collectives among threads of one process (fp32 host tensors): the in-process `--tp N` run.
#pragma once

#include <barrier>
#include <memory>
#include <vector>

#include "collectives/collective.h"

namespace gemma2 {

// Shared by the `size` rank threads of one group; each thread uses its own LocalCollective.
class LocalGroup {
 public:
  explicit LocalGroup(int size) : size_(size), barrier_(size), slots_(size, nullptr) {}
  int size() const { return size_; }

 private:
  friend class LocalCollective;
  int size_;
  std::barrier<> barrier_;
  std::vector<float*> slots_;  // each rank's buffer during an all-reduce
  std::vector<float> sum_;
};

class LocalCollective final : public Collective {
 public:
  LocalCollective(std::shared_ptr<LocalGroup> group, int rank)
      : group_(std::move(group)), rank_(rank) {}
  int rank() const override { return rank_; }
  int size() const override { return group_->size(); }
  Status AllReduceSum(Tensor& t) override;

 private:
  std::shared_ptr<LocalGroup> group_;
  int rank_;
};

}  // namespace gemma2
