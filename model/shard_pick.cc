#include "model/shard_pick.h"

#include <algorithm>
#include <cmath>

#include "common/sampling_noise.h"

namespace gemma2 {
namespace {

// Slot layout: [best score, best id, shard size, max v, normalizer hi, normalizer lo,
//               kShardCandidates x (v, id)], ids as floats (exact below 2^24), -1 for none.
constexpr int64_t kHeader = 6;

bool Top(const SamplingParams& p) { return !p.greedy && (p.top_k > 0 || p.top_p < 1.0f); }

struct Candidate {
  float v;
  int64_t id;
};

// The best-scoring slot's id of one summed exchange row (shards in vocabulary order: ties keep the
// lowest id, as SampleRow); 0 when no slot offers one.
int32_t BestSlot(const float* row, int tp, int64_t width) {
  float best = -INFINITY;
  int64_t best_id = -1;
  for (int k = 0; k < tp; ++k) {
    const float* slot = row + k * width;
    if (slot[1] < 0) continue;
    if (best_id < 0 || slot[0] > best) {
      best = slot[0];
      best_id = static_cast<int64_t>(slot[1]);
    }
  }
  return static_cast<int32_t>(best_id < 0 ? 0 : best_id);
}

}  // namespace

void DecideShardBest(std::span<const float> exchange, int64_t rows, int tp, int32_t* ids) {
  for (int64_t i = 0; i < rows; ++i) ids[i] = BestSlot(exchange.data() + i * tp * 2, tp, 2);
}

int64_t ShardPickSlotWidth(std::span<const RowSampling> sampling) {
  const bool any_top = std::any_of(sampling.begin(), sampling.end(),
                                   [](const RowSampling& s) { return Top(s.params); });
  return any_top ? kHeader + 2 * kShardCandidates : 2;
}

void FillShardPick(std::span<const float> local, int64_t rows, int64_t shard, int64_t vocab_begin,
                   std::span<const RowSampling> sampling, int rank, int tp, int64_t width,
                   std::span<float> exchange) {
  std::vector<Candidate> c;
  for (int64_t i = 0; i < rows; ++i) {
    const RowSampling& s = sampling[static_cast<size_t>(i)];
    const float* x = local.data() + i * shard;
    float* slot = exchange.data() + (i * tp + rank) * width;
    if (!Top(s.params)) {  // greedy or temperature-only: this shard's best score
      float best = -INFINITY;
      int64_t best_j = -1;
      for (int64_t j = 0; j < shard; ++j) {
        const float score =
            s.params.greedy
                ? x[j]
                : x[j] / s.params.temperature +
                      GumbelNoise(s.params.seed, s.counter, static_cast<uint64_t>(vocab_begin + j));
        if (best_j < 0 || score > best) {
          best = score;
          best_j = j;
        }
      }
      slot[0] = best;
      slot[1] = best_j < 0 ? -1.0f : static_cast<float>(vocab_begin + best_j);
      continue;
    }
    c.clear();
    float m = -INFINITY;
    for (int64_t j = 0; j < shard; ++j) {
      const float v = x[j] / s.params.temperature;  // as SampleRow divides, in float
      c.push_back({v, vocab_begin + j});
      m = std::max(m, v);
    }
    double z = 0;
    for (const Candidate& k : c) z += std::exp(static_cast<double>(k.v) - m);
    const int64_t n = std::min<int64_t>(kShardCandidates, shard);
    std::partial_sort(c.begin(), c.begin() + n, c.end(),
                      [](const Candidate& a, const Candidate& b) {
                        return a.v > b.v || (a.v == b.v && a.id < b.id);
                      });
    slot[1] = -1.0f;
    slot[2] = static_cast<float>(shard);
    slot[3] = m;
    slot[4] = static_cast<float>(z);  // the normalizer as two floats: ~48 bits survive the sum
    slot[5] = static_cast<float>(z - static_cast<double>(slot[4]));
    for (int64_t k = 0; k < kShardCandidates; ++k) {
      slot[kHeader + 2 * k] = k < n ? c[static_cast<size_t>(k)].v : 0.0f;
      slot[kHeader + 2 * k + 1] = k < n ? static_cast<float>(c[static_cast<size_t>(k)].id) : -1.0f;
    }
  }
}

bool DecideShardPick(std::span<const float> exchange, int64_t rows, int tp, int64_t width,
                     int64_t vocab, std::span<const RowSampling> sampling, int32_t* ids) {
  std::vector<int32_t> out(static_cast<size_t>(rows));
  std::vector<Candidate> merged;
  for (int64_t i = 0; i < rows; ++i) {
    const SamplingParams& p = sampling[static_cast<size_t>(i)].params;
    const float* row = exchange.data() + i * tp * width;
    if (!Top(p)) {
      out[static_cast<size_t>(i)] = BestSlot(row, tp, width);
      continue;
    }
    // The global maximum, normalizer, candidates, and the largest value any rank left out.
    float m = -INFINITY;
    for (int k = 0; k < tp; ++k) m = std::max(m, row[k * width + 3]);
    double z = 0;
    float left_out = -INFINITY;
    merged.clear();
    for (int k = 0; k < tp; ++k) {
      const float* slot = row + k * width;
      z += (static_cast<double>(slot[4]) + slot[5]) * std::exp(static_cast<double>(slot[3]) - m);
      int64_t sent = 0;
      for (int64_t j = 0; j < kShardCandidates && slot[kHeader + 2 * j + 1] >= 0; ++j, ++sent) {
        merged.push_back({slot[kHeader + 2 * j], static_cast<int64_t>(slot[kHeader + 2 * j + 1])});
      }
      if (static_cast<int64_t>(slot[2]) > sent && sent > 0)
        left_out = std::max(left_out, slot[kHeader + 2 * (sent - 1)]);
    }
    std::sort(merged.begin(), merged.end(), [](const Candidate& a, const Candidate& b) {
      return a.v > b.v || (a.v == b.v && a.id < b.id);
    });
    // Thresholds as SampleRow sets them, decided only above every value left out.
    float tau = -INFINITY;
    const int64_t n = static_cast<int64_t>(merged.size());
    if (p.top_k > 0 && p.top_k < vocab) {
      if (p.top_k > n || !(merged[static_cast<size_t>(p.top_k - 1)].v > left_out)) return false;
      tau = merged[static_cast<size_t>(p.top_k - 1)].v;
    }
    if (p.top_p < 1.0f) {
      double cum = 0;
      bool decided = false;
      for (int64_t j = 0; j < n && merged[static_cast<size_t>(j)].v > left_out; ++j) {
        cum += std::exp(static_cast<double>(merged[static_cast<size_t>(j)].v) - m);
        if (j + 1 < n && merged[static_cast<size_t>(j + 1)].v == merged[static_cast<size_t>(j)].v)
          continue;
        if (cum >= p.top_p * z) {
          tau = std::max(tau, merged[static_cast<size_t>(j)].v);
          decided = true;
          break;
        }
      }
      if (!decided) return false;
    }
    // Gumbel-max over the kept tokens (all among the candidates); equal scores keep the lowest id.
    int64_t best = -1;
    float best_score = -INFINITY;
    for (const Candidate& k : merged) {
      if (k.v < tau) continue;
      const float score = k.v + GumbelNoise(p.seed, sampling[static_cast<size_t>(i)].counter,
                                            static_cast<uint64_t>(k.id));
      if (best < 0 || score > best_score || (score == best_score && k.id < best)) {
        best = k.id;
        best_score = score;
      }
    }
    out[static_cast<size_t>(i)] = static_cast<int32_t>(best);
  }
  std::copy(out.begin(), out.end(), ids);
  return true;
}

}  // namespace gemma2
