// Types shared by kernel launchers and their host callers (host-includable).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace gemma2::kernels {

using bf16 = __nv_bfloat16;

inline unsigned CeilDiv(int64_t a, int64_t b) { return static_cast<unsigned>((a + b - 1) / b); }

}  // namespace gemma2::kernels
