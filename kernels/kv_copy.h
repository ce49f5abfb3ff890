// Copies whole KV-cache blocks (a prefix shared by a new sequence). Twin of
// CpuBackend::CopyKvBlocks.
#pragma once

#include "kernels/types.h"

namespace gemma2::kernels {

// For every layer slot s < slots and pair i < pairs: block pairs[2i + 1] of slot s receives block
// pairs[2i] of slot s, in k and in v. Slot s starts at k + s * slot_elems; a block holds
// block_elems values (a multiple of 8). `pairs` lives on the device; no destination is also a
// source (the copies run in parallel). One launch.
cudaError_t CopyKvBlocks(bf16* k, bf16* v, int64_t slots, int64_t slot_elems, int64_t block_elems,
                         const int32_t* pairs, int64_t count, cudaStream_t stream);

}  // namespace gemma2::kernels
