#include "common/gpu_inventory.h"

#include <cctype>
#include <cstdlib>
#include <filesystem>
#include <sstream>

namespace gemma2 {

int CountVisibleDevices(const std::string& value) {
  int count = 0;
  std::stringstream in(value);
  std::string entry;
  while (std::getline(in, entry, ',')) {
    while (!entry.empty() && std::isspace(static_cast<unsigned char>(entry.front())))
      entry.erase(entry.begin());
    while (!entry.empty() && std::isspace(static_cast<unsigned char>(entry.back())))
      entry.pop_back();
    const bool index = !entry.empty() && std::isdigit(static_cast<unsigned char>(entry[0])) &&
                       entry.find_first_not_of("0123456789") == std::string::npos;
    const bool uuid = entry.rfind("GPU-", 0) == 0 || entry.rfind("MIG-", 0) == 0;
    if (!index && !uuid) break;
    ++count;
  }
  return count;
}

int VisibleGpuCount(const std::string& dev_dir) {
  if (const char* v = std::getenv("CUDA_VISIBLE_DEVICES")) return CountVisibleDevices(v);
  std::error_code ec;
  int count = 0;
  for (const auto& e : std::filesystem::directory_iterator(dev_dir, ec)) {
    const std::string name = e.path().filename().string();
    if (name.size() > 6 && name.rfind("nvidia", 0) == 0 &&
        name.find_first_not_of("0123456789", 6) == std::string::npos) {
      ++count;
    }
  }
  return ec ? 0 : count;
}

Result<int> GpusForNode(int node, int ranks_on_node, int gpus_per_node) {
  const bool detected = gpus_per_node <= 0;
  const int gpus = detected ? VisibleGpuCount() : gpus_per_node;
  if (detected && gpus == 0) return 0;
  if (ranks_on_node > gpus) {
    return InvalidArgument("node " + std::to_string(node) + " runs " +
                           std::to_string(ranks_on_node) + " GPU ranks but has " +
                           std::to_string(gpus) + " GPU" + (gpus == 1 ? "" : "s") +
                           (detected ? " (detected; set --gpus-per-node or CUDA_VISIBLE_DEVICES)"
                                     : " (--gpus-per-node)"));
  }
  return gpus;
}

}  // namespace gemma2
