// The GPUs a process on this node may use, found without creating a CUDA context (launchers and
// the coordinator never touch a device): CUDA_VISIBLE_DEVICES when it is set, else the device
// files /dev/nvidia0, /dev/nvidia1, ... (a container sees only its own). 0: none found.
#pragma once

#include <optional>
#include <string>

#include "common/status.h"

namespace gemma2 {

// Devices CUDA would enumerate under this CUDA_VISIBLE_DEVICES value: entries up to the first
// invalid one (CUDA stops there; "-1" hides every device). Indices and GPU-/MIG- UUIDs count.
int CountVisibleDevices(const std::string& cuda_visible_devices);

// CountVisibleDevices(CUDA_VISIBLE_DEVICES) when set; else the nvidiaN files in `dev_dir`.
int VisibleGpuCount(const std::string& dev_dir = "/dev");

// The GPUs of a node that runs `ranks_on_node` GPU ranks, one each: `gpus_per_node`, or (0) the
// detected count. Too few is an error naming the node and both counts; a detection that finds
// nothing is not (the ranks' own CUDA errors then say more), and returns 0.
Result<int> GpusForNode(int node, int ranks_on_node, int gpus_per_node);

}  // namespace gemma2
