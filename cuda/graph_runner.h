// Decode steps as CUDA graphs. A decode step's kernel arguments depend only on its key (batch
// size, output kind, attention's context bucket) because its inputs are staged at the same
// addresses every time: a key's first step runs eagerly (creating GEMM plans and scratch), its
// second is captured, later ones replay that graph. A replayed step still runs its host code
// (staging this step's inputs), but every launch goes through Launch, which a replay skips: the
// graph holds it already. Ops and the forward pass never ask which phase a step is in.
#pragma once

#include <cuda_runtime.h>

#include <functional>
#include <map>
#include <optional>
#include <tuple>

#include "common/status.h"
#include "model/backend.h"

namespace gemma2 {

class GraphRunner {
 public:
  // batch, output kind, context bucket, token masks (structured output)
  using Key = std::tuple<size_t, StepOutputKind, int, bool>;

  explicit GraphRunner(cudaStream_t stream) : stream_(stream) {}
  ~GraphRunner();
  GraphRunner(const GraphRunner&) = delete;
  GraphRunner& operator=(const GraphRunner&) = delete;

  // Starts a step (the stream has drained): eager without a key, else the key's next phase.
  Status Begin(std::optional<Key> key);
  // Runs `launch` (work on the stream) now or into the capture; a replay skips it.
  template <class Work>
  void Launch(Work&& work) {
    if (phase_ != Phase::kReplaying) work();
  }
  // Ends the step's graph section: a capture becomes the key's graph, a captured or replayed
  // graph is launched; what follows in the step runs eagerly. `ops` is the step's status so far:
  // a capture in which an op failed is dropped (the key is captured again next time), `ops`
  // returned.
  Status EndSection(const Status& ops);
  // Inside a capture or a replay: work that needs the host mid-step is not allowed.
  bool in_graph() const { return phase_ != Phase::kEager; }
  // A replay: the step's staged inputs are read by the graph's own copies.
  bool replaying() const { return phase_ == Phase::kReplaying; }

 private:
  enum class Phase { kEager, kCapturing, kReplaying };
  struct Graph {
    bool warm = false;  // ran eagerly once
    cudaGraphExec_t exec = nullptr;
  };
  cudaStream_t stream_;
  std::map<Key, Graph> graphs_;
  Graph* current_ = nullptr;
  Phase phase_ = Phase::kEager;
};

}  // namespace gemma2
