// Types shared by kernel launchers and their host callers (host-includable).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace gemma2::kernels {

using bf16 = __nv_bfloat16;

inline unsigned CeilDiv(int64_t a, int64_t b) { return static_cast<unsigned>((a + b - 1) / b); }

// The current device's SM count, asked once per process (a process drives one kind of GPU).
inline int DeviceSmCount() {
  static const int sms = [] {
    int device = 0, n = 0;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device);
    return n;
  }();
  return sms;
}

}  // namespace gemma2::kernels
