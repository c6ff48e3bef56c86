#include "model/sampling/logprobs.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace kvgate::model {

Logprobs ComputeLogprobs(std::span<const float> logits, int k) {
  Logprobs out;
  if (logits.empty()) return out;
  float max = -std::numeric_limits<float>::infinity();
  for (float v : logits) max = std::max(max, v);
  double sum = 0;
  for (float v : logits) sum += std::exp(static_cast<double>(v) - max);
  out.log_sum_exp = max + std::log(sum);
  k = std::clamp(k, 0, std::min(kMaxTopLogprobs, static_cast<int>(logits.size())));
  if (k == 0) return out;
  // A running top-k (k <= 20) in one pass.
  auto better = [](const std::pair<int32_t, float>& a, const std::pair<int32_t, float>& b) {
    return a.second > b.second || (a.second == b.second && a.first < b.first);
  };
  std::vector<std::pair<int32_t, float>>& top = out.top;
  for (size_t i = 0; i < logits.size(); ++i) {
    const std::pair<int32_t, float> c{static_cast<int32_t>(i), logits[i]};
    if (static_cast<int>(top.size()) < k) {
      top.insert(std::upper_bound(top.begin(), top.end(), c, better), c);
    } else if (better(c, top.back())) {
      top.pop_back();
      top.insert(std::upper_bound(top.begin(), top.end(), c, better), c);
    }
  }
  for (auto& [id, v] : top) v = out.Of(v);
  return out;
}

}  // namespace kvgate::model
