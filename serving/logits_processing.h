// What the coordinator does to a logits row before SampleRow when a request asks for more than the
// backends sample on their own: penalties, min_p, and log-probabilities.
#pragma once

#include <cstdint>
#include <span>
#include <unordered_map>
#include <utility>
#include <vector>

#include "model/tokenizer.h"
#include "serving/api.h"

namespace gemma2::serving {

// Token -> how often it appeared in the generated text so far.
using TokenCounts = std::unordered_map<int32_t, int32_t>;

// vLLM's semantics: repetition_penalty divides positive (multiplies negative) logits of every
// token seen in the prompt or output; frequency and presence penalties subtract count * f and
// [count > 0] * p for tokens of the output.
void ApplyPenalties(std::span<float> logits, const GenerationOptions& g,
                    const std::vector<int32_t>& prompt, const TokenCounts& output);

// OpenAI's logit_bias (added), vLLM's allowed_token_ids (every other token -inf), min_tokens
// (EOS and stop_token_ids -inf while fewer than min_tokens were generated) and bad_words (a
// word's last token -inf where the generated text ends with the rest of the word).
void ApplyTokenRules(std::span<float> logits, const GenerationOptions& g,
                     const std::vector<int32_t>& generated, const std::vector<int64_t>& eos_ids);

// vLLM's bad_words as token sequences: each word as encoded alone and, when that gives other
// tokens of the same count, after a space (the word mid-text).
std::vector<std::vector<int32_t>> BadWordSequences(const std::vector<std::string>& words,
                                                   const Tokenizer& tok);

// Removes (-inf) every token whose probability at `temperature` is below min_p times the largest.
void ApplyMinP(std::span<float> logits, float min_p, float temperature);

struct TokenLogprobs {
  float chosen = 0;                            // log-probability of the picked token
  int64_t rank = 1;                            // 1 + how many tokens are more likely
  std::vector<std::pair<int32_t, float>> top;  // the k most likely, most likely first
};

// Log-probabilities of the model's distribution (log_softmax of the row as the model gave it).
TokenLogprobs Logprobs(std::span<const float> logits, int32_t chosen, int k);

}  // namespace gemma2::serving
