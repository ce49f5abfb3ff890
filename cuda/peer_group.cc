#include "cuda/peer_group.h"

#include <cuda_runtime.h>
#include <unistd.h>

#include <cstring>
#include <fstream>

#include "common/cuda_check.h"

namespace gemma2 {
namespace {

// Ranks may map each other only on the same machine (the same boot of it).
std::string MachineId() {
  std::ifstream f("/proc/sys/kernel/random/boot_id");
  std::string id;
  std::getline(f, id);
  char host[256] = {};
  gethostname(host, sizeof(host) - 1);
  return std::string(host) + "/" + id;
}

}  // namespace

Result<std::unique_ptr<PeerGroup>> PeerGroup::Create(int rank, int size, int64_t max_rows,
                                                     int64_t hidden, const PeerExchange& exchange) {
  if (size < 2 || size > kernels::kMaxPeers)
    return InvalidArgument("peer all-reduce: a group of " + std::to_string(size) + " ranks");
  std::unique_ptr<PeerGroup> g(new PeerGroup());
  const size_t inbox = kernels::PeerInboxBytes(size, max_rows, hidden);
  const size_t bytes = inbox + kernels::PeerFlagBytes(max_rows) + max_rows * sizeof(uint32_t);
  RETURN_IF_CUDA_ERROR(cudaMalloc(&g->own_, bytes));
  RETURN_IF_CUDA_ERROR(cudaMemset(g->own_, 0, bytes));  // flags and call counters start at 0
  RETURN_IF_CUDA_ERROR(cudaDeviceSynchronize());
  cudaIpcMemHandle_t handle;
  RETURN_IF_CUDA_ERROR(cudaIpcGetMemHandle(&handle, g->own_));
  // Round 1: machine and handle. Round 2: whether each rank mapped every other.
  const std::string mine =
      MachineId() + '\n' + std::string(reinterpret_cast<const char*>(&handle), sizeof(handle));
  ASSIGN_OR_RETURN(const std::vector<std::string> all, exchange("peer-handles", mine));
  bool ok = static_cast<int>(all.size()) == size;
  for (const std::string& s : all)
    ok = ok && s.size() == mine.size() &&
         s.substr(0, s.find('\n')) == mine.substr(0, mine.find('\n'));
  g->view_.rank = rank;
  g->view_.size = size;
  g->view_.max_rows = max_rows;
  g->view_.hidden = hidden;
  std::string why = ok ? "" : "the ranks are not on one machine";
  for (int k = 0; k < size && ok; ++k) {
    void* base = g->own_;
    if (k != rank) {
      cudaIpcMemHandle_t h;
      std::memcpy(&h, all[static_cast<size_t>(k)].data() + mine.find('\n') + 1, sizeof(h));
      const cudaError_t e = cudaIpcOpenMemHandle(&base, h, cudaIpcMemLazyEnablePeerAccess);
      if (e != cudaSuccess) {
        cudaGetLastError();
        ok = false;
        why = "mapping rank " + std::to_string(k) + ": " + cudaGetErrorString(e);
        break;
      }
      g->opened_.push_back(base);
    }
    g->view_.inbox[k] = static_cast<kernels::bf16*>(base);
    g->view_.flags[k] = reinterpret_cast<uint32_t*>(static_cast<char*>(base) + inbox);
  }
  g->view_.calls = reinterpret_cast<uint32_t*>(static_cast<char*>(g->own_) + inbox +
                                               kernels::PeerFlagBytes(max_rows));
  ASSIGN_OR_RETURN(const std::vector<std::string> mapped,
                   exchange("peer-mapped", ok ? "1" : "0:" + why));
  for (size_t k = 0; k < mapped.size(); ++k) {
    if (mapped[k] != "1") {
      return Status(StatusCode::kUnavailable,
                    "peer all-reduce: rank " + std::to_string(k) + " " +
                        (mapped[k].size() > 2 ? mapped[k].substr(2) : "failed"));
    }
  }
  return g;
}

PeerGroup::~PeerGroup() {
  for (void* p : opened_) cudaIpcCloseMemHandle(p);
  if (own_) cudaFree(own_);
}

}  // namespace gemma2
