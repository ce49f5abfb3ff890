// gemma2-kv-plan-bench: what the coordinator's block planning (KvBlockTables::Plan) costs per
// decode step, on the host: `batch` sequences of `context` positions at 27B's layout (window
// 4096, blocks of 16), each step one token per sequence.
//   gemma2-kv-plan-bench [batch 64] [context 2048] [steps 2000]
#include <chrono>
#include <cstdio>
#include <cstdlib>

#include "model/kv_blocks.h"
#include "model/step.h"

int main(int argc, char** argv) {
  using namespace gemma2;
  const int batch = argc > 1 ? std::atoi(argv[1]) : 64;
  const int64_t context = argc > 2 ? std::atoll(argv[2]) : 2048;
  const int steps = argc > 3 ? std::atoi(argv[3]) : 2000;
  KvLayout layout;
  layout.block_size = 16;
  layout.window = 4096;
  layout.max_blocks = 8192 / 16;
  layout.present = {true, true};
  KvBlockTables tables(layout, int64_t{1} << 20);
  std::map<int64_t, int64_t> lengths;
  for (int s = 0; s < batch; ++s) {
    StepPlan p;
    StepSequence q;
    q.sequence_id = s;
    q.tokens.assign(static_cast<size_t>(context), 0);
    p.sequences.push_back(q);
    lengths[s] = 0;
    if (!tables.Plan(p, &p.kv_assign).ok()) return 1;
    lengths[s] = context;
  }
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < steps; ++i) {
    StepPlan p;
    for (int s = 0; s < batch; ++s) {
      StepSequence q;
      q.sequence_id = s;
      q.start_pos = lengths[s];
      q.tokens = {0};
      p.sequences.push_back(std::move(q));
    }
    if (!tables.Plan(p, &p.kv_assign).ok()) return 2;
    for (auto& [id, n] : lengths) ++n;
  }
  const double us =
      std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count();
  std::printf("KvBlockTables::Plan: %d sequences from %lld positions: %.1f us per step\n", batch,
              static_cast<long long>(context), us / steps);
  return 0;
}
