#include "model/sampling/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "model/sampling/logprobs.h"

namespace kvgate::model {

absl::Status SamplingParams::Validate() const {
  auto bad = [](const char* name, double v, const char* range) {
    return absl::InvalidArgumentError(absl::StrCat("invalid ", name, " ", v, ": must be ", range));
  };
  if (!(temperature >= 0.0) || !std::isfinite(temperature))
    return bad("temperature", temperature, ">= 0");
  if (top_k < 0) return bad("top_k", static_cast<double>(top_k), ">= 0 (0 disables it)");
  if (logprobs < -1 || logprobs > kMaxTopLogprobs) {
    return bad("logprobs", logprobs, "in [0, 20] (-1: none)");
  }
  if (!(top_p > 0.0 && top_p <= 1.0)) return bad("top_p", top_p, "in (0, 1]");
  if (!(min_p >= 0.0 && min_p <= 1.0)) return bad("min_p", min_p, "in [0, 1]");
  if (!(repetition_penalty > 0.0) || !std::isfinite(repetition_penalty)) {
    return bad("repetition_penalty", repetition_penalty, "> 0 (1 disables it)");
  }
  if (!(presence_penalty >= -2.0 && presence_penalty <= 2.0)) {
    return bad("presence_penalty", presence_penalty, "in [-2, 2]");
  }
  if (!(frequency_penalty >= -2.0 && frequency_penalty <= 2.0)) {
    return bad("frequency_penalty", frequency_penalty, "in [-2, 2]");
  }
  return absl::OkStatus();
}

Sampler::Sampler(const SamplingParams& params)
    : params_(params), rng_(params.seed ? *params.seed : std::random_device{}()) {}

double Sampler::Uniform() { return static_cast<double>(rng_() >> 11) * 0x1.0p-53; }

int32_t Sampler::Sample(std::span<float> logits, std::span<const int32_t> prompt,
                        std::span<const int32_t> generated) {
  const int32_t vocab = static_cast<int32_t>(logits.size());
  auto in_vocab = [vocab](int32_t t) { return t >= 0 && t < vocab; };
  // Penalties.
  if (params_.repetition_penalty != 1.0) {
    const float rp = static_cast<float>(params_.repetition_penalty);
    std::vector<bool> seen(static_cast<size_t>(vocab), false);
    for (std::span<const int32_t> ids : {prompt, generated}) {
      for (int32_t t : ids) {
        if (!in_vocab(t) || seen[static_cast<size_t>(t)]) continue;
        seen[static_cast<size_t>(t)] = true;
        float& l = logits[static_cast<size_t>(t)];
        l = l > 0 ? l / rp : l * rp;
      }
    }
  }
  if (params_.presence_penalty != 0.0 || params_.frequency_penalty != 0.0) {
    counts_.assign(static_cast<size_t>(vocab), 0);
    for (int32_t t : generated)
      if (in_vocab(t)) ++counts_[static_cast<size_t>(t)];
    for (int32_t t = 0; t < vocab; ++t) {
      const int32_t n = counts_[static_cast<size_t>(t)];
      if (n == 0) continue;
      logits[static_cast<size_t>(t)] -=
          static_cast<float>(params_.presence_penalty + params_.frequency_penalty * n);
    }
  }
  if (params_.greedy()) {
    // First maximum, as torch.argmax.
    return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
  }
  // Temperature, then the candidates sorted by logit (descending, ties by id).
  const double inv_t = 1.0 / params_.temperature;
  order_.resize(static_cast<size_t>(vocab));
  std::iota(order_.begin(), order_.end(), 0);
  auto by_logit = [&logits](int32_t a, int32_t b) {
    const float la = logits[static_cast<size_t>(a)], lb = logits[static_cast<size_t>(b)];
    return la > lb || (la == lb && a < b);
  };
  size_t keep = order_.size();
  if (params_.top_k > 0 && static_cast<size_t>(params_.top_k) < keep) {
    keep = static_cast<size_t>(params_.top_k);
    std::partial_sort(order_.begin(), order_.begin() + static_cast<ptrdiff_t>(keep), order_.end(),
                      by_logit);
  } else {
    std::sort(order_.begin(), order_.end(), by_logit);
  }
  // Softmax over the kept candidates.
  std::vector<double> probs(keep);
  const double max_l = logits[static_cast<size_t>(order_[0])] * inv_t;
  double sum = 0.0;
  for (size_t i = 0; i < keep; ++i) {
    probs[i] = std::exp(logits[static_cast<size_t>(order_[i])] * inv_t - max_l);
    sum += probs[i];
  }
  for (double& p : probs) p /= sum;
  if (params_.top_p < 1.0) {
    double cum = 0.0;
    size_t n = 0;
    while (n < keep) {
      cum += probs[n++];
      if (cum >= params_.top_p) break;
    }
    keep = std::max<size_t>(n, 1);
  }
  if (params_.min_p > 0.0) {
    const double threshold = params_.min_p * probs[0];
    size_t n = 1;
    while (n < keep && probs[n] >= threshold) ++n;
    keep = n;
  }
  double total = 0.0;
  for (size_t i = 0; i < keep; ++i) total += probs[i];
  const double u = Uniform() * total;
  double cum = 0.0;
  for (size_t i = 0; i < keep; ++i) {
    cum += probs[i];
    if (u < cum) return order_[i];
  }
  return order_[keep - 1];
}

}  // namespace kvgate::model
