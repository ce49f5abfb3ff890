// NcclCollective between real GPU processes (2 GPUs; skips with one line otherwise): sums are
// right, and a peer that never joins ends in the watchdog's abort instead of a hang; the fused
// one-shot all-reduce over CUDA IPC (cuda backend, ConnectPeers) gives the same bits as a sum then
// AddRmsNorm, eagerly and replayed from a graph. Each rank is this program started again (CUDA
// does not survive fork once the parent has touched it), told its part by GEMMA2_NCCL_TEST_RANK /
// _DIR / _CASE; main() runs that part instead of the tests.
#include "collectives/nccl_collective.h"

#include <cuda_runtime.h>
#include <gloo/rendezvous/file_store.h>
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <string>
#include <vector>

#include "collectives/store_exchange.h"
#include "engine/backend_factory.h"
#include "engine/engine.h"
#include "tests/test_files.h"

namespace gemma2 {
namespace {

// One rank's life in a child process; returns its exit code (0: as expected).
int RunRank(int rank, const std::string& dir, bool peer_hangs) {
  if (cudaSetDevice(rank) != cudaSuccess) return 10;
  cudaStream_t stream;
  if (cudaStreamCreate(&stream) != cudaSuccess) return 11;
  gloo::rendezvous::FileStore store(dir);
  NcclOptions o;
  o.rank = rank;
  o.size = 2;
  o.device = rank;
  o.stream = stream;
  o.init_timeout = std::chrono::seconds(60);
  o.who = "test rank " + std::to_string(rank);
  auto c = NcclCollective::Create(o, store, peer_hangs ? "id-hang" : "id");
  if (!c.ok()) return 12;
  const int64_t n = 4099;  // odd
  std::vector<float> host(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) host[static_cast<size_t>(i)] = static_cast<float>((rank + 1) * i);
  float* dev = nullptr;
  if (cudaMalloc(&dev, n * sizeof(float)) != cudaSuccess) return 13;
  cudaMemcpy(dev, host.data(), n * sizeof(float), cudaMemcpyHostToDevice);
  Tensor t;
  t.data = dev;
  t.rows = 1;
  t.cols = n;
  t.dtype = DType::kF32;
  if (peer_hangs && rank == 1) {  // joins the group, then never takes part in the all-reduce
    sleep(20);
    return 0;
  }
  const auto start = std::chrono::steady_clock::now();
  (*c)->Arm(std::chrono::seconds(peer_hangs ? 2 : 30));
  const Status st = (*c)->AllReduceSum(t);
  const cudaError_t synced = cudaStreamSynchronize(stream);
  (*c)->Disarm();
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (peer_hangs) {
    // The watchdog aborted the communicator: the wait ended, and later calls say why.
    (void)st;
    (void)synced;
    const Status after = (*c)->AllReduceSum(t);
    return s < 10 && !after.ok() && after.message().find("aborted") != std::string::npos ? 0 : 20;
  }
  if (!st.ok() || synced != cudaSuccess) return 21;
  cudaMemcpy(host.data(), dev, n * sizeof(float), cudaMemcpyDeviceToHost);
  for (int64_t i = 0; i < n; ++i) {
    if (host[static_cast<size_t>(i)] != static_cast<float>(3 * i)) return 22;
  }
  return 0;
}

// Host values rounded to bf16, so what the device holds is what the host computes with.
std::vector<float> RandBf16(size_t n, uint64_t seed, float scale) {
  std::vector<float> v(n);
  uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
  for (auto& x : v) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    const float u = static_cast<float>(static_cast<double>(s >> 11) / 9007199254740992.0) - 0.5f;
    x = Bf16ToF32(F32ToBf16(u * scale));
  }
  return v;
}

// Rank `rank` of two: the fused op on its own delta equals AddRmsNorm of bf16(d0 + d1) computed
// on the host, bit for bit, for five calls of ragged row counts, then for three replays of a
// graph that captured one call (the call counters live on the device). Exit code 0: equal.
int RunPeerRank(int rank, const std::string& dir) {
  BackendOptions eo;
  eo.name = "cuda";
  eo.kv_cache_bytes = int64_t{64} << 20;
  eo.poison_scratch = true;
  eo.device = rank;
  auto b = MakeBackend(eo);
  if (!b.ok()) return 30;
  Backend& be = **b;
  gloo::rendezvous::FileStore store(dir);
  const PeerExchange exchange = [&](const std::string& key, const std::string& mine) {
    return ExchangeThroughStore(store, key, rank, 2, mine);
  };
  const int64_t hidden = 4608;
  if (!be.ConnectPeers(rank, 2, hidden, exchange).ok()) return 31;
  if (!be.BeginStep({}, StepOutputKind::kLogits, false).ok()) return 32;
  auto up = [&](const std::vector<float>& h, int64_t rows) {
    auto t = be.Upload(h.data(), DType::kF32, rows, hidden);
    return t.ok() ? *t : Tensor{};
  };
  const Tensor post_w = up(RandBf16(hidden, 1, 0.5f), 1), next_w = up(RandBf16(hidden, 2, 0.5f), 1);
  auto get = [&](const Tensor& t) {
    std::vector<float> h(static_cast<size_t>(t.numel()));
    return be.ToHost(t, h.data()).ok() ? h : std::vector<float>{};
  };
  auto check = [&](int64_t rows, uint64_t seed, const Tensor& fused_res, const Tensor& fused_out,
                   const std::vector<float>& res0) -> bool {
    const size_t n = static_cast<size_t>(rows * hidden);
    const auto d0 = RandBf16(n, seed * 2, 8.0f), d1 = RandBf16(n, seed * 2 + 1, 8.0f);
    std::vector<float> sum(n);
    for (size_t i = 0; i < n; ++i) sum[i] = Bf16ToF32(F32ToBf16(d0[i] + d1[i]));
    Tensor res = up(res0, rows), s = up(sum, rows), out = be.Alloc(rows, hidden);
    be.AddRmsNorm(res, s, post_w, &next_w, 1e-6f, out);
    return get(res) == get(fused_res) && get(out) == get(fused_out) && !get(out).empty();
  };
  // Eager calls of 1, 7, 64, 3 and 256 rows.
  uint64_t seed = 10;
  for (int64_t rows : {1, 7, 64, 3, 256}) {
    ++seed;
    const size_t n = static_cast<size_t>(rows * hidden);
    const auto res0 = RandBf16(n, seed + 1000, 4.0f);
    Tensor res = up(res0, rows), delta = up(RandBf16(n, seed * 2 + rank, 8.0f), rows);
    Tensor out = be.Alloc(rows, hidden);
    if (!be.AllReduceAddRmsNorm(res, delta, post_w, &next_w, 1e-6f, out)) return 33;
    if (!check(rows, seed, res, out, res0)) return 34;
  }
  // 257 rows are more than the buffers hold: declined, nothing done.
  Tensor big = be.Alloc(257, hidden);
  if (be.AllReduceAddRmsNorm(big, big, post_w, &next_w, 1e-6f, big)) return 35;
  // One call captured, replayed three times over fresh inputs in the same buffers.
  const int64_t rows = 16;
  const size_t n = static_cast<size_t>(rows * hidden);
  Tensor res = up(std::vector<float>(n, 0.0f), rows), delta = up(std::vector<float>(n, 0.0f), rows);
  Tensor out = be.Alloc(rows, hidden);
  cudaStream_t stream = static_cast<cudaStream_t>(be.native_stream());
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  if (cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal) != cudaSuccess) return 36;
  const bool captured = be.AllReduceAddRmsNorm(res, delta, post_w, &next_w, 1e-6f, out);
  if (cudaStreamEndCapture(stream, &graph) != cudaSuccess || !captured) return 37;
  if (cudaGraphInstantiate(&exec, graph, 0) != cudaSuccess) return 38;
  for (int replay = 0; replay < 3; ++replay) {
    ++seed;
    const auto res0 = RandBf16(n, seed + 1000, 4.0f);
    const auto d = RandBf16(n, seed * 2 + rank, 8.0f);
    std::vector<uint16_t> rb(n), db(n);
    for (size_t i = 0; i < n; ++i) {
      rb[i] = F32ToBf16(res0[i]);
      db[i] = F32ToBf16(d[i]);
    }
    if (cudaMemcpy(res.data, rb.data(), n * 2, cudaMemcpyHostToDevice) != cudaSuccess ||
        cudaMemcpy(delta.data, db.data(), n * 2, cudaMemcpyHostToDevice) != cudaSuccess ||
        cudaGraphLaunch(exec, stream) != cudaSuccess ||
        cudaStreamSynchronize(stream) != cudaSuccess)
      return 39;
    if (!check(rows, seed, res, out, res0)) return 40 + replay;
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  return 0;
}

enum class PairCase { kSum, kHang, kPeer };

void RunPair(PairCase what) {
  testing::TempDir dir;
  pid_t pids[2];
  for (int r = 0; r < 2; ++r) {
    pids[r] = fork();
    if (pids[r] == 0) {
      setenv("GEMMA2_NCCL_TEST_RANK", std::to_string(r).c_str(), 1);
      setenv("GEMMA2_NCCL_TEST_DIR", dir.path().c_str(), 1);
      setenv("GEMMA2_NCCL_TEST_CASE", std::to_string(static_cast<int>(what)).c_str(), 1);
      execl("/proc/self/exe", "nccl_collective_test", static_cast<char*>(nullptr));
      _exit(127);
    }
  }
  for (int r = 0; r < 2; ++r) {
    int status = 0;
    waitpid(pids[r], &status, 0);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0)
        << "rank " << r << " exit " << (WIFEXITED(status) ? WEXITSTATUS(status) : -1);
  }
}

bool TwoGpus() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n >= 2;
}

// The path a one-GPU worker takes: a group of one through NCCL, eagerly and inside a captured
// graph, then an abort that every later call reports.
TEST(NcclCollectiveTest, AGroupOfOneIsTheIdentityEagerAndCapturedThenAborts) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n < 1) GTEST_SKIP() << "skipped: needs a GPU";
  ASSERT_EQ(cudaSetDevice(0), cudaSuccess);
  cudaStream_t stream;
  ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
  testing::TempDir dir;
  gloo::rendezvous::FileStore store(dir.path().string());
  NcclOptions o;
  o.rank = 0;
  o.size = 1;
  o.device = 0;
  o.stream = stream;
  o.who = "test rank 0";
  auto c = NcclCollective::Create(o, store, "one");
  ASSERT_TRUE(c.ok()) << c.status().message();
  const int64_t count = 1027;
  std::vector<float> host(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) host[static_cast<size_t>(i)] = 0.5f * static_cast<float>(i);
  float* dev = nullptr;
  ASSERT_EQ(cudaMalloc(&dev, count * sizeof(float)), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(dev, host.data(), count * sizeof(float), cudaMemcpyHostToDevice),
            cudaSuccess);
  Tensor t;
  t.data = dev;
  t.rows = 1;
  t.cols = count;
  t.dtype = DType::kF32;
  (*c)->Arm(std::chrono::seconds(30));
  ASSERT_TRUE((*c)->AllReduceSum(t).ok());
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), cudaSuccess);
  const Status captured = (*c)->AllReduceSum(t);
  ASSERT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
  ASSERT_TRUE(captured.ok()) << captured.message();
  ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  for (int i = 0; i < 3; ++i) ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  (*c)->Disarm();
  std::vector<float> back(static_cast<size_t>(count));
  ASSERT_EQ(cudaMemcpy(back.data(), dev, count * sizeof(float), cudaMemcpyDeviceToHost),
            cudaSuccess);
  EXPECT_EQ(back, host);
  (*c)->Abort("test abort");
  (*c)->Abort("second abort");  // idempotent: the first reason stays
  const Status after = (*c)->AllReduceSum(t);
  EXPECT_FALSE(after.ok());
  EXPECT_NE(after.message().find("test abort"), std::string::npos) << after.message();
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaFree(dev);
  cudaStreamDestroy(stream);
}

TEST(NcclCollectiveTest, SumsAcrossTwoGpus) {
  if (!TwoGpus()) GTEST_SKIP() << "skipped: needs 2 GPUs";
  RunPair(PairCase::kSum);
}

TEST(NcclCollectiveTest, AHungPeerEndsInTheWatchdogsAbort) {
  if (!TwoGpus()) GTEST_SKIP() << "skipped: needs 2 GPUs";
  RunPair(PairCase::kHang);
}

TEST(NcclCollectiveTest, FusedPeerAllReduceEqualsSumThenAddRmsNorm) {
  if (!TwoGpus()) GTEST_SKIP() << "skipped: needs 2 GPUs";
  RunPair(PairCase::kPeer);
}

}  // namespace
}  // namespace gemma2

int main(int argc, char** argv) {
  if (const char* rank = std::getenv("GEMMA2_NCCL_TEST_RANK")) {
    const char* dir = std::getenv("GEMMA2_NCCL_TEST_DIR");
    const char* what = std::getenv("GEMMA2_NCCL_TEST_CASE");
    if (dir == nullptr || what == nullptr) return 2;
    const auto c = static_cast<gemma2::PairCase>(std::atoi(what));
    if (c == gemma2::PairCase::kPeer) return gemma2::RunPeerRank(std::atoi(rank), dir);
    return gemma2::RunRank(std::atoi(rank), dir, c == gemma2::PairCase::kHang);
  }
  testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
