#include "cuda/graph_runner.h"

#include "common/cuda_check.h"

namespace gemma2 {

GraphRunner::~GraphRunner() {
  if (phase_ == Phase::kCapturing) {
    cudaGraph_t abandoned = nullptr;
    if (cudaStreamEndCapture(stream_, &abandoned) == cudaSuccess && abandoned)
      cudaGraphDestroy(abandoned);
  }
  for (auto& [key, g] : graphs_) {
    if (g.exec) cudaGraphExecDestroy(g.exec);
  }
}

Status GraphRunner::Begin(std::optional<Key> key) {
  if (phase_ == Phase::kCapturing) {  // a step that failed before its section ended
    cudaGraph_t abandoned = nullptr;
    if (cudaStreamEndCapture(stream_, &abandoned) == cudaSuccess && abandoned)
      cudaGraphDestroy(abandoned);
  }
  phase_ = Phase::kEager;
  current_ = nullptr;
  if (!key) return OkStatus();
  current_ = &graphs_[*key];
  if (current_->exec) {
    phase_ = Phase::kReplaying;
  } else if (current_->warm) {
    RETURN_IF_CUDA_ERROR(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
    phase_ = Phase::kCapturing;
  } else {
    current_->warm = true;
  }
  return OkStatus();
}

Status GraphRunner::EndSection(const Status& ops) {
  const Phase phase = phase_;
  phase_ = Phase::kEager;
  if (phase == Phase::kCapturing) {
    cudaGraph_t graph = nullptr;
    RETURN_IF_CUDA_ERROR(cudaStreamEndCapture(stream_, &graph));
    if (!ops.ok()) {
      if (graph) cudaGraphDestroy(graph);
      return ops;
    }
    const cudaError_t e = cudaGraphInstantiate(&current_->exec, graph, 0);
    cudaGraphDestroy(graph);
    RETURN_IF_CUDA_ERROR(e);
  }
  if (phase != Phase::kEager && ops.ok()) RETURN_IF_CUDA_ERROR(cudaGraphLaunch(current_->exec, stream_));
  return ops;
}

}  // namespace gemma2
