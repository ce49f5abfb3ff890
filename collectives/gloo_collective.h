// Collectives between cpu worker processes: Gloo over TCP, behind the Collective interface.
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include "collectives/collective.h"

namespace gloo {
class Context;
namespace rendezvous {
class Store;
}
}  // namespace gloo

namespace gemma2 {

struct GlooOptions {
  int rank = 0;
  int size = 1;
  std::string hostname = "127.0.0.1";  // address this rank listens on
  // Every wait (connecting, each all-reduce) ends by then with kDeadlineExceeded, never hangs.
  std::chrono::milliseconds timeout{60000};
};

class GlooCollective final : public Collective {
 public:
  // Connects all ranks through `store` (the rendezvous: a shared directory in tests, the control
  // plane in the cluster). Fails with the rank and the reason when a peer does not show up.
  static Result<std::unique_ptr<GlooCollective>> Create(const GlooOptions& opts,
                                                        gloo::rendezvous::Store& store);
  // A rendezvous through files in `dir` (all ranks on one machine or a shared file system).
  // `prefix` separates groups sharing the directory ("tp-0", "pp-1-0", ...).
  static Result<std::unique_ptr<GlooCollective>> CreateWithFileStore(const GlooOptions& opts,
                                                                     const std::string& dir,
                                                                     const std::string& prefix = "");
  ~GlooCollective() override;
  GlooCollective(const GlooCollective&) = delete;
  GlooCollective& operator=(const GlooCollective&) = delete;

  int rank() const override { return opts_.rank; }
  int size() const override { return opts_.size; }
  // fp32 host tensors. Every rank ends with the same bits (ring order, fixed for a given size).
  // A peer that died or stopped answering ends it with an error naming this rank, not a hang.
  Status AllReduceSum(Tensor& t) override;
  Status SendTo(const Tensor& t, int peer) override;
  Status RecvFrom(Tensor& t, int peer) override;

 private:
  explicit GlooCollective(const GlooOptions& o) : opts_(o) {}
  GlooOptions opts_;
  std::shared_ptr<gloo::Context> context_;
  uint32_t tag_ = 0;
};

}  // namespace gemma2
