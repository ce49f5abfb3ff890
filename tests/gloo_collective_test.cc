// Collectives and tensor parallelism across real processes (fork) over Gloo/TCP on loopback:
// sums equal what each rank computes from the seeds, a dead or absent peer is an error within the
// timeout (never a hang), and a tp-sharded forward across processes equals the one-process run.
#include "collectives/gloo_collective.h"

#include <gloo/rendezvous/file_store.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <functional>
#include <stdexcept>

#include "collectives/store_exchange.h"
#include "cpu/cpu_backend.h"
#include "engine/engine.h"
#include "engine/generate.h"
#include "tests/reference_util.h"
#include "tests/test_files.h"

namespace gemma2 {
namespace {

using Clock = std::chrono::steady_clock;

// Runs body(rank) in `size` child processes; returns their exit codes (0 = passed).
std::vector<int> RunRanks(int size, const std::function<int(int)>& body) {
  std::vector<pid_t> pids;
  for (int r = 0; r < size; ++r) {
    const pid_t pid = fork();
    if (pid == 0) {
      int code = 99;
      try {
        code = body(r);
      } catch (...) {
        code = 98;
      }
      _exit(code);
    }
    pids.push_back(pid);
  }
  std::vector<int> codes;
  for (pid_t pid : pids) {
    int status = 0;
    waitpid(pid, &status, 0);
    codes.push_back(WIFEXITED(status) ? WEXITSTATUS(status) : 100 + WTERMSIG(status));
  }
  return codes;
}

GlooOptions Opts(int rank, int size, int timeout_ms) {
  GlooOptions o;
  o.rank = rank;
  o.size = size;
  o.timeout = std::chrono::milliseconds(timeout_ms);
  return o;
}

float Value(int rank, int64_t i) { return static_cast<float>((rank + 1) * 0.25 + (i % 97) * 1e-3); }

TEST(GlooCollectiveTest, SumsEqualWhatEachRankExpects) {
  for (int size : {2, 3, 4}) {
    testing::TempDir store;
    const auto codes = RunRanks(size, [&](int rank) {
      SetCpuMathThreads(1);
      auto c = GlooCollective::CreateWithFileStore(Opts(rank, size, 20000), store.path().string());
      if (!c.ok()) return 1;
      CpuBackend b;
      for (int64_t n : {int64_t{7}, int64_t{1000}, int64_t{300001}}) {
        Tensor t = b.Alloc(1, n);
        for (int64_t i = 0; i < n; ++i) t.as<float>()[i] = Value(rank, i);
        if (!(*c)->AllReduceSum(t).ok()) return 2;
        for (int64_t i = 0; i < n; ++i) {
          double expect = 0;
          for (int r = 0; r < size; ++r) expect += Value(r, i);
          if (std::abs(t.as<float>()[i] - expect) > 1e-5 * std::abs(expect)) return 3;
        }
      }
      return 0;
    });
    EXPECT_EQ(codes, std::vector<int>(static_cast<size_t>(size), 0)) << "size " << size;
  }
}

TEST(GlooCollectiveTest, DeadPeerIsAnErrorWithinTheTimeout) {
  testing::TempDir store;
  const auto codes = RunRanks(2, [&](int rank) {
    signal(SIGPIPE, SIG_IGN);  // as gemma2-worker: a dead peer is an error, not a signal
    auto c = GlooCollective::CreateWithFileStore(Opts(rank, 2, 3000), store.path().string());
    if (!c.ok()) return 1;
    CpuBackend b;
    Tensor t = b.Alloc(1, 1000);
    if (!(*c)->AllReduceSum(t).ok()) return 5;  // both alive: fine
    if (rank == 1) return 0;                    // then rank 1 leaves
    const auto start = Clock::now();
    const Status st = (*c)->AllReduceSum(t);
    const double s = std::chrono::duration<double>(Clock::now() - start).count();
    if (st.ok()) return 2;
    if (st.message().find("gloo rank 0/2") == std::string::npos) return 3;
    return s < 6.0 ? 0 : 4;
  });
  EXPECT_EQ(codes, (std::vector<int>{0, 0}));
}

TEST(GlooCollectiveTest, AbsentPeerFailsToConnectWithinTheTimeout) {
  testing::TempDir store;
  const auto start = Clock::now();
  auto c = GlooCollective::CreateWithFileStore(Opts(0, 2, 1500), store.path().string());
  const double s = std::chrono::duration<double>(Clock::now() - start).count();
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("connecting to the group"), std::string::npos)
      << c.status().message();
  EXPECT_LT(s, 10.0);
}

// A store whose waits always time out (as a real one does when a peer never publishes).
class TimedOutStore final : public gloo::rendezvous::Store {
 public:
  void set(const std::string&, const std::vector<char>&) override {}
  std::vector<char> get(const std::string& key) override {
    throw std::runtime_error("timed out waiting for " + key);
  }
  void wait(const std::vector<std::string>&) override {}
};

// Three processes trade strings through a file store: each gets all three in rank order; a store
// that gives up is kUnavailable naming the key.
TEST(GlooCollectiveTest, ExchangeThroughStoreGathersInRankOrder) {
  testing::TempDir dir;
  const auto codes = RunRanks(3, [&](int rank) {
    gloo::rendezvous::FileStore store(dir.path().string());
    auto all = ExchangeThroughStore(store, "k", rank, 3, std::string(rank + 1, 'a' + rank));
    return all.ok() && *all == std::vector<std::string>{"a", "bb", "ccc"} ? 0 : 1;
  });
  EXPECT_EQ(codes, (std::vector<int>{0, 0, 0}));
  TimedOutStore store;
  auto lone = ExchangeThroughStore(store, "lone", 0, 2, "x");
  ASSERT_FALSE(lone.ok());
  EXPECT_EQ(lone.status().code(), StatusCode::kUnavailable);
  EXPECT_NE(lone.status().message().find("rendezvous 'lone'"), std::string::npos)
      << lone.status().message();
}

// Each process loads only its shard and runs the forward; rank 0 writes what it got.
TEST(GlooCollectiveTest, TensorParallelProcessesEqualOneProcess) {
  const auto dir =
      std::filesystem::path(GEMMA2_SOURCE_DIR) / "tests/data/references/gqa4_window_published";
  const auto ref = testing::LoadReference(dir);
  auto ck = Checkpoint::Open(dir);
  ASSERT_TRUE(ck.ok()) << ck.status().ToString();
  // The one-process run.
  auto engine = Engine::Create(**ck, {"cpu", 1, 1});
  ASSERT_TRUE(engine.ok());
  GenerationRequest req;
  req.prompt = ref.prompt_ids;
  req.max_new_tokens = 4;
  req.ignore_eos = true;
  req.return_logits = true;
  auto base = Generate(**engine, {req});
  ASSERT_TRUE(base.ok());
  const auto& want = (*base)[0];

  for (int tp : {2, 4}) {
    SCOPED_TRACE("tp " + std::to_string(tp));
    testing::TempDir work;
    const auto out_file = work.path() / "rank0.bin";
    const auto codes = RunRanks(tp, [&](int rank) {
      SetCpuMathThreads(1);
      auto local_ck = Checkpoint::Open(dir);
      auto plan = ShardPlan::Make((*local_ck)->config(), tp, rank);
      if (!local_ck.ok() || !plan.ok()) return 1;
      CpuBackend backend;
      auto model = RankModel::Load(**local_ck, *plan, backend);
      if (!model.ok()) return 2;
      std::filesystem::create_directories(work.path() / "store");
      auto comm = GlooCollective::CreateWithFileStore(Opts(rank, tp, 30000),
                                                      (work.path() / "store").string());
      if (!comm.ok()) return 3;
      const int64_t block_size = 16;
      auto blocks = (*model)->CreateKvPool(block_size, 64);
      if (!blocks.ok()) return 5;
      KvBlockTables kv(KvLayout::For((*local_ck)->config(), block_size), *blocks);
      std::vector<float> rows;
      std::vector<int32_t> tokens = ref.prompt_ids;
      int64_t pos = 0;
      for (int step = 0; step < 4; ++step) {
        StepPlan p;
        StepSequence s;
        s.start_pos = pos;
        s.tokens = step == 0 ? tokens : std::vector<int32_t>{tokens.back()};
        for (int64_t i = 0; i < static_cast<int64_t>(s.tokens.size()); ++i)
          s.output_rows.push_back(i);
        pos += static_cast<int64_t>(s.tokens.size());
        p.sequences.push_back(s);
        StepOutput out;
        if (!kv.Plan(p, &p.kv_assign).ok()) return 6;
        if (!(*model)->Forward(p, kv, **comm, &out).ok()) return 4;
        rows.insert(rows.end(), out.values.begin(), out.values.end());
        tokens.push_back(SampleRow({out.row(out.rows - 1), static_cast<size_t>(out.width)}, {}));
      }
      if (rank == 0) {
        std::ofstream f(out_file, std::ios::binary);
        f.write(reinterpret_cast<const char*>(rows.data()),
                static_cast<std::streamsize>(rows.size() * 4));
        f.write(reinterpret_cast<const char*>(tokens.data() + ref.prompt_ids.size()), 4 * 4);
      }
      return 0;
    });
    ASSERT_EQ(codes, std::vector<int>(static_cast<size_t>(tp), 0));
    std::ifstream f(out_file, std::ios::binary);
    const int64_t width = ref.width, nrows = static_cast<int64_t>(want.logits.size());
    std::vector<float> rows(static_cast<size_t>(nrows * width));
    std::vector<int32_t> gen(4);
    f.read(reinterpret_cast<char*>(rows.data()), static_cast<std::streamsize>(rows.size() * 4));
    f.read(reinterpret_cast<char*>(gen.data()), 16);
    ASSERT_TRUE(f.good());
    EXPECT_EQ(gen, want.generated);
    for (int64_t r = 0; r < nrows; ++r) {
      EXPECT_LE(testing::RelativeL2(rows.data() + r * width,
                                    want.logits[static_cast<size_t>(r)].data(), width),
                1e-5)
          << "row " << r;
    }
  }
}

}  // namespace
}  // namespace gemma2
