#include "engine/backend_factory.h"

#include "cpu/cpu_backend.h"
#ifdef GEMMA2_HAVE_CUDA
#include "cuda/cuda_backend.h"
#endif

namespace gemma2 {

Result<std::unique_ptr<Backend>> MakeBackend(const BackendOptions& o) {
  if (o.name == "cpu") return std::unique_ptr<Backend>(std::make_unique<CpuBackend>());
  if (o.name == "cuda") {
#ifdef GEMMA2_HAVE_CUDA
    CudaOptions c;
    c.device = o.device;
    c.kv_cache_bytes = o.kv_cache_bytes;
    c.poison_scratch = o.poison_scratch;
    c.cuda_graphs = o.cuda_graphs;
    c.max_positions = o.max_positions;
    return MakeCudaBackend(c);
#else
    return Unimplemented("this build has no cuda backend (no CUDA toolkit was found at build time)");
#endif
  }
  return InvalidArgument("unknown backend '" + o.name + "' (use cpu or cuda)");
}

}  // namespace gemma2
