// Backends by name: the one place that knows which backends this build has.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "common/status.h"
#include "model/backend.h"

namespace gemma2 {

struct BackendOptions {
  // A backend by name, the rest defaulted. Not an aggregate on purpose: EngineOptions{"cpu", 2, 1}
  // must mean backend, tp, threads, never brace-elide into this struct's fields.
  BackendOptions(const char* backend_name = "cpu") : name(backend_name) {}  // NOLINT: implicit
  std::string name;              // cpu or cuda
  int device = 0;                // cuda: the GPU index
  int64_t kv_cache_bytes = 0;    // cuda: 0 = most of the memory free after the weights
  bool poison_scratch = false;   // cuda tests: NaN-fill scratch so unwritten elements show
  bool cuda_graphs = true;       // cuda: replay id-only decode steps as CUDA graphs
  int64_t max_positions = 8192;  // a sequence's most positions (the KV block-table stride)
};

// A clear error for a name this build lacks (cuda without a CUDA toolkit at build time).
Result<std::unique_ptr<Backend>> MakeBackend(const BackendOptions& options);

}  // namespace gemma2
