// The product backend: bf16 weights and activations on one GPU, fp32 accumulation, the kernels
// of kernels/ and cuBLASLt, a paged KV cache. Every op is tested against its CpuBackend twin.
#pragma once

#include <memory>

#include "common/status.h"
#include "model/backend.h"

namespace gemma2 {

struct CudaOptions {
  int device = 0;
  // CreateKvPool without a block count: these bytes; 0: 95% of the memory free then less 8 GiB,
  // or a quarter of it on a GPU another process already fills.
  int64_t kv_cache_bytes = 0;
  bool poison_scratch = false;   // tests: fill every scratch tensor with NaN before use
  bool cuda_graphs = true;       // replay greedy decode steps as CUDA graphs, one per batch size
  int64_t max_positions = 8192;  // longest sequence (fixes the block-table stride)
  // The fused one-shot all-reduce (ConnectPeers): steps of at most this many tokens use it; a
  // peer that does not arrive within peer_timeout_s fails the step instead of hanging it.
  int64_t peer_max_rows = 256;
  int64_t peer_timeout_s = 30;
};

Result<std::unique_ptr<Backend>> MakeCudaBackend(const CudaOptions& options);

}  // namespace gemma2
