// Collectives inside one tensor-parallel group, behind one interface: in-process threads
// (local_collective.h), Gloo over TCP for cpu workers and NCCL for cuda workers. The model core
// sees only this header (gemma2_collective_api).
#pragma once

#include "common/status.h"
#include "common/tensor.h"

namespace gemma2 {

class Collective {
 public:
  virtual ~Collective() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // t = sum over ranks of t, elementwise, in rank order (deterministic). Every rank calls it with
  // tensors of the same shape; fails rather than hangs when a peer is gone.
  virtual Status AllReduceSum(Tensor& t) = 0;
  // Point to point inside the group (pipeline stages pass activations): the whole tensor to or
  // from `peer`; both sides agree on the shape. Groups without it refuse.
  virtual Status SendTo(const Tensor& t, int peer) { return Unimplemented("this collective has no send"); }
  virtual Status RecvFrom(Tensor& t, int peer) { return Unimplemented("this collective has no receive"); }
};

// The group of one: AllReduceSum is the identity.
class SoloCollective final : public Collective {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  Status AllReduceSum(Tensor&) override { return OkStatus(); }
};

}  // namespace gemma2
