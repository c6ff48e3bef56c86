// Token sampling on the host: penalties, temperature, top-k, top-p, min-p, seeded draws.
// Order as in Hugging Face and vLLM: penalties, then temperature, top-k, top-p, min-p.
#pragma once

#include <cstdint>
#include <optional>
#include <random>
#include <span>
#include <vector>

#include "absl/status/status.h"

namespace kvgate::model {

struct SamplingParams {
  double temperature = 1.0;         // 0: greedy
  int64_t top_k = 0;                // 0: off
  double top_p = 1.0;               // 1: off
  double min_p = 0.0;               // 0: off
  double repetition_penalty = 1.0;  // Hugging Face style, over prompt and generated tokens
  double presence_penalty = 0.0;    // OpenAI style, over generated tokens
  double frequency_penalty = 0.0;   // OpenAI style, over generated tokens
  std::optional<uint64_t> seed;     // unset: a random seed
  // The API's logprobs (not the sampler's concern; carried to the last stage with the rest):
  // -1: none; k >= 0: the sampled token's logprob and the k likeliest alternatives.
  int32_t logprobs = -1;

  // INVALID_ARGUMENT naming the parameter when a value is out of range.
  absl::Status Validate() const;
  bool greedy() const { return temperature == 0.0; }
};

class Sampler {
 public:
  explicit Sampler(const SamplingParams& params);

  // Picks the next token from `logits` [vocab_size] (modified in place).
  int32_t Sample(std::span<float> logits, std::span<const int32_t> prompt,
                 std::span<const int32_t> generated);

 private:
  double Uniform();  // [0, 1)

  SamplingParams params_;
  std::mt19937_64 rng_;
  std::vector<int32_t> order_;
  std::vector<int32_t> counts_;
};

}  // namespace kvgate::model
