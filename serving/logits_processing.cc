#include "serving/logits_processing.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <unordered_set>

namespace gemma2::serving {

void ApplyPenalties(std::span<float> logits, const GenerationOptions& g,
                    const std::vector<int32_t>& prompt, const TokenCounts& output) {
  if (g.repetition_penalty != 1.0f) {
    std::unordered_set<int32_t> seen(prompt.begin(), prompt.end());
    for (const auto& [tok, n] : output) seen.insert(tok);
    for (int32_t tok : seen) {
      float& v = logits[static_cast<size_t>(tok)];
      v = v > 0 ? v / g.repetition_penalty : v * g.repetition_penalty;
    }
  }
  if (g.frequency_penalty != 0 || g.presence_penalty != 0) {
    for (const auto& [tok, n] : output) {
      logits[static_cast<size_t>(tok)] -=
          static_cast<float>(n) * g.frequency_penalty + (n > 0 ? g.presence_penalty : 0.0f);
    }
  }
}

void ApplyMinP(std::span<float> logits, float min_p, float temperature) {
  if (min_p <= 0) return;
  const float best = *std::max_element(logits.begin(), logits.end());
  // p_i / p_max = exp((l_i - l_max) / T) < min_p  <=>  l_i < l_max + T * log(min_p)
  const float cut = best + temperature * std::log(min_p);
  for (float& v : logits) {
    if (v < cut) v = -std::numeric_limits<float>::infinity();
  }
}

TokenLogprobs Logprobs(std::span<const float> logits, int32_t chosen, int k) {
  const float best = *std::max_element(logits.begin(), logits.end());
  double sum = 0;
  for (float v : logits) sum += std::exp(static_cast<double>(v - best));
  const float log_z = best + static_cast<float>(std::log(sum));
  TokenLogprobs out;
  const float chosen_logit = logits[static_cast<size_t>(chosen)];
  out.chosen = chosen_logit - log_z;
  out.rank = 1 + std::count_if(logits.begin(), logits.end(),
                               [&](float v) { return v > chosen_logit; });
  if (k > 0) {
    std::vector<int32_t> idx(logits.size());
    for (size_t i = 0; i < idx.size(); ++i) idx[i] = static_cast<int32_t>(i);
    const size_t kk = std::min(static_cast<size_t>(k), idx.size());
    std::partial_sort(idx.begin(), idx.begin() + static_cast<std::ptrdiff_t>(kk), idx.end(),
                      [&](int32_t a, int32_t b) {
                        const float va = logits[static_cast<size_t>(a)],
                                    vb = logits[static_cast<size_t>(b)];
                        return va > vb || (va == vb && a < b);
                      });
    for (size_t i = 0; i < kk; ++i)
      out.top.emplace_back(idx[i], logits[static_cast<size_t>(idx[i])] - log_z);
  }
  return out;
}

void ApplyTokenRules(std::span<float> logits, const GenerationOptions& g,
                     const std::vector<int32_t>& generated, const std::vector<int64_t>& eos_ids) {
  const auto in_row = [&](int32_t id) {
    return id >= 0 && static_cast<size_t>(id) < logits.size();
  };
  for (const auto& [id, bias] : g.logit_bias) {
    if (in_row(id)) logits[static_cast<size_t>(id)] += bias;
  }
  if (!g.allowed_token_ids.empty()) {
    std::vector<float> kept(g.allowed_token_ids.size());
    for (size_t i = 0; i < kept.size(); ++i) {
      const int32_t id = g.allowed_token_ids[i];
      kept[i] = in_row(id) ? logits[static_cast<size_t>(id)] : -INFINITY;
    }
    std::fill(logits.begin(), logits.end(), -INFINITY);
    for (size_t i = 0; i < kept.size(); ++i) {
      if (in_row(g.allowed_token_ids[i]))
        logits[static_cast<size_t>(g.allowed_token_ids[i])] = kept[i];
    }
  }
  for (const auto& word : g.bad_words) {
    const size_t prefix = word.size() - 1;
    if (prefix > generated.size() || !in_row(word.back())) continue;
    if (std::equal(word.begin(), word.end() - 1, generated.end() - static_cast<std::ptrdiff_t>(prefix)))
      logits[static_cast<size_t>(word.back())] = -INFINITY;
  }
  if (static_cast<int64_t>(generated.size()) < g.min_tokens) {
    for (int64_t id : eos_ids) {  // with ignore_eos, EOS ends nothing: left as it is
      if (!g.ignore_eos && id >= 0 && static_cast<size_t>(id) < logits.size())
        logits[static_cast<size_t>(id)] = -INFINITY;
    }
    for (int32_t id : g.stop_token_ids) {
      if (in_row(id)) logits[static_cast<size_t>(id)] = -INFINITY;
    }
  }
}

std::vector<std::vector<int32_t>> BadWordSequences(const std::vector<std::string>& words,
                                                   const Tokenizer& tok) {
  std::vector<std::vector<int32_t>> out;
  for (const std::string& word : words) {
    const std::string bare = word.substr(std::min(word.find_first_not_of(' '), word.size()));
    auto alone = tok.Encode(bare, /*add_bos=*/false);
    if (!alone.ok() || alone->empty()) continue;
    out.push_back(*alone);
    auto spaced = tok.Encode(" " + bare, /*add_bos=*/false);
    if (spaced.ok() && spaced->size() == alone->size() && spaced->front() != alone->front())
      out.push_back(*spaced);
  }
  return out;
}

}  // namespace gemma2::serving
