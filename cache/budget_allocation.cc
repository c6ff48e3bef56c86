#include "cache/budget_allocation.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "cache/eviction/policy.h"

namespace kvgate::cache {

const std::vector<std::string>& AllocationNames() {
  static const std::vector<std::string> names = {"uniform", "pyramid", "adaptive"};
  return names;
}

std::vector<int64_t> PyramidBudgets(int64_t mean, int64_t num_layers, double beta, int64_t floor) {
  std::vector<int64_t> out(static_cast<size_t>(std::max<int64_t>(num_layers, 0)), mean);
  if (num_layers < 2 || mean <= floor) return out;
  const double lo = static_cast<double>(mean) / beta;
  const double hi = 2.0 * static_cast<double>(mean) - lo;
  const double step = (hi - lo) / static_cast<double>(num_layers - 1);
  std::vector<double> frac(out.size());
  for (int64_t l = 0; l < num_layers; ++l) {
    const double v = hi - step * static_cast<double>(l);
    out[static_cast<size_t>(l)] = std::max<int64_t>(floor, static_cast<int64_t>(std::floor(v)));
    frac[static_cast<size_t>(l)] = v - std::floor(v);
  }
  const int64_t total = mean * num_layers;
  int64_t sum = std::accumulate(out.begin(), out.end(), int64_t{0});
  // Raised to the floor: take it back from the largest layers.
  while (sum > total) {
    auto top = std::max_element(out.begin(), out.end());
    if (*top <= floor) break;
    --*top;
    --sum;
  }
  // Rounded down: give the rest to the layers with the largest fractions, lower layers first.
  std::vector<size_t> order(out.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return frac[a] > frac[b]; });
  for (size_t i = 0; sum < total; i = (i + 1) % order.size(), ++sum) ++out[order[i]];
  return out;
}

std::vector<int64_t> LayerBudgets(const EvictionParams& params, int64_t first_layer, int64_t count,
                                  int64_t model_layers) {
  if (params.allocation != "pyramid") {
    return std::vector<int64_t>(static_cast<size_t>(count), params.budget);
  }
  const std::vector<int64_t> all =
      PyramidBudgets(params.budget, std::max(model_layers, first_layer + count),
                     params.pyramid_beta, params.min_budget());
  return std::vector<int64_t>(all.begin() + first_layer, all.begin() + first_layer + count);
}

}  // namespace kvgate::cache
