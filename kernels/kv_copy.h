// Copies whole KV-cache blocks (a prefix shared by a new sequence). Twin of
// CpuBackend::CopyKvBlocks.
#pragma once

#include "kernels/types.h"

namespace gemma2::kernels {

// For every layer slot s < slots and pair i < pairs: block pairs[2i + 1] of slot s receives block
// pairs[2i] of slot s, in a and in b (keys and values, or their FP8 scales). Slot s starts at
// byte s * slot_bytes; a block is block_bytes (a multiple of 4; 16-byte copies when it is a
// multiple of 16). `pairs` lives on the device; no destination is also a source (the copies run
// in parallel). One launch.
cudaError_t CopyKvBlocks(void* a, void* b, int64_t slots, int64_t slot_bytes, int64_t block_bytes,
                         const int32_t* pairs, int64_t count, cudaStream_t stream);

}  // namespace gemma2::kernels
