#include "engine/engine.h"

#include <chrono>
#include <cstdio>
#include <thread>

#include "collectives/local_collective.h"
#include "cpu/cpu_backend.h"
#include "engine/backend_factory.h"

namespace gemma2 {

struct Engine::Rank {
  std::unique_ptr<Backend> backend;
  std::unique_ptr<RankModel> model;
  std::unique_ptr<Collective> comm;
};

Engine::~Engine() = default;

Result<std::unique_ptr<Engine>> Engine::Create(const WeightSource& ck, const EngineOptions& opts) {
  if (opts.backend.name == "cuda" && opts.tp > 1) {
    return Unimplemented(
        "the cuda backend runs tp 1 in one process; tp > 1 needs one worker process per GPU (the "
        "cluster)");
  }
  std::unique_ptr<Engine> e(new Engine());
  e->config_ = ck.config();
  // Check every rank's plan before loading anything.
  std::vector<ShardPlan> plans;
  for (int r = 0; r < opts.tp; ++r) {
    ASSIGN_OR_RETURN(auto p, ShardPlan::Make(e->config_, opts.tp, r));
    plans.push_back(p);
  }
  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  SetCpuMathThreads(opts.tp > 1 ? 1 : (opts.threads > 0 ? opts.threads : cores));
  auto group = std::make_shared<LocalGroup>(opts.tp);
  // Ranks load one after another: offset each rank's counts by the ranks before it.
  int64_t done_bytes = 0, done_tensors = 0, all_bytes = 0, all_tensors = 0;
  RankModel::Progress per_rank;
  if (opts.progress) {
    per_rank = [&](int64_t b, int64_t tb, int64_t t, int64_t tt) {
      if (all_bytes == 0) {
        all_bytes = tb * opts.tp;
        all_tensors = tt * opts.tp;
      }
      opts.progress(done_bytes + b, all_bytes, done_tensors + t, all_tensors);
      if (t == tt) {
        done_bytes += b;
        done_tensors += t;
      }
    };
  }
  for (int r = 0; r < opts.tp; ++r) {
    auto rank = std::make_unique<Rank>();
    BackendOptions bo = opts.backend;
    bo.device = r;
    bo.max_positions = e->config_.max_position_embeddings;
    ASSIGN_OR_RETURN(rank->backend, MakeBackend(bo));
    ASSIGN_OR_RETURN(rank->model,
                     RankModel::Load(ck, plans[static_cast<size_t>(r)], *rank->backend, per_rank,
                                     opts.quantization));
    if (opts.tp == 1) {
      rank->comm = std::make_unique<SoloCollective>();
    } else {
      rank->comm = std::make_unique<LocalCollective>(group, r);
    }
    e->ranks_.push_back(std::move(rank));
  }
  // Every rank's pool holds as many blocks as the first one's.
  int64_t blocks = opts.kv_blocks;
  for (auto& rank : e->ranks_) {
    ASSIGN_OR_RETURN(blocks,
                     rank->model->CreateKvPool(opts.kv_block_size, blocks, opts.kv_cache_dtype));
  }
  e->kv_ = std::make_unique<KvBlockTables>(KvLayout::For(e->config_, opts.kv_block_size), blocks);
  return e;
}

RankModel::Progress StderrLoadProgress(std::string name) {
  struct State {
    std::chrono::steady_clock::time_point start = std::chrono::steady_clock::now(), last;
  };
  auto st = std::make_shared<State>();
  return [name = std::move(name), st](int64_t b, int64_t tb, int64_t t, int64_t tt) {
    const auto now = std::chrono::steady_clock::now();
    if (t < tt && now - st->last < std::chrono::milliseconds(500)) return;
    st->last = now;
    const double s = std::chrono::duration<double>(now - st->start).count();
    std::fprintf(stderr, "%s: loading %.2f / %.2f GB, %ld / %ld tensors, %.2f GB/s%s", name.c_str(),
                 b / 1e9, tb / 1e9, static_cast<long>(t), static_cast<long>(tt),
                 s > 0 ? b / 1e9 / s : 0.0, t < tt ? "\r" : "\n");
  };
}

int64_t Engine::NewSequence() {
  const int64_t id = next_id_++;
  lengths_[id] = 0;
  return id;
}

void Engine::ReleaseSequence(int64_t id) {
  kv_->Release(id);
  lengths_.erase(id);
}

int64_t Engine::SequenceLength(int64_t id) const {
  auto it = lengths_.find(id);
  return it == lengths_.end() ? -1 : it->second;
}

Result<StepOutput> Engine::Step(const StepPlan& plan) {
  if (!down_.ok()) return down_;
  RETURN_IF_ERROR(ValidateStep(config_, lengths_, plan));
  std::vector<KvAssign> applied;  // every rank reads the one set of tables: nothing to send
  RETURN_IF_ERROR(kv_->Plan(plan, &applied));
  const size_t n = ranks_.size();
  std::vector<StepOutput> outs(n);
  std::vector<Status> statuses(n);
  auto run_rank = [&](size_t r) {
    Rank& rank = *ranks_[r];
    for (const KvCopy& k : plan.kv_copies) {
      statuses[r] = rank.model->CopyKv(*kv_, k);
      if (!statuses[r].ok()) return;  // every rank fails alike: no collective is left waiting
    }
    statuses[r] = rank.model->Forward(plan, *kv_, *rank.comm, &outs[r]);
  };
  if (n == 1) {
    run_rank(0);
  } else {
    std::vector<std::thread> threads;
    for (size_t r = 0; r < n; ++r) threads.emplace_back(run_rank, r);
    for (auto& th : threads) th.join();
  }
  for (size_t r = 0; r < n; ++r) {
    if (!statuses[r].ok()) return down_ = statuses[r].WithContext("rank " + std::to_string(r));
  }
  StepPlan::ApplyCopies(plan.kv_copies, lengths_);
  for (const auto& s : plan.sequences)
    lengths_[s.sequence_id] += static_cast<int64_t>(s.tokens.size());
  return std::move(outs[0]);
}

}  // namespace gemma2
