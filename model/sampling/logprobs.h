// Log-probabilities of the model's next-token distribution for the API's logprobs: those of the
// raw logits (before temperature, penalties and truncation, as vLLM reports them by default).
#pragma once

#include <cstdint>
#include <span>
#include <utility>
#include <vector>

namespace kvgate::model {

// Most alternatives a request may ask for (OpenAI's top_logprobs limit).
inline constexpr int kMaxTopLogprobs = 20;

struct Logprobs {
  double log_sum_exp = 0;                      // log of the softmax's denominator
  std::vector<std::pair<int32_t, float>> top;  // the k likeliest (id, logprob), likeliest first

  float Of(float logit) const { return static_cast<float>(logit - log_sum_exp); }
};

// `logits`: [vocab]. The normalizer and the `k` (<= kMaxTopLogprobs) likeliest tokens; ties go to
// the smaller id.
Logprobs ComputeLogprobs(std::span<const float> logits, int k);

}  // namespace kvgate::model
