// Percentiles of the serving benchmarks' latencies (nearest rank).
#pragma once

#include <algorithm>
#include <cstddef>
#include <vector>

namespace kvgate::bench {

// The p-th percentile (0 to 100) of `v`; 0 when empty.
inline double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t i = std::min(v.size() - 1, static_cast<size_t>(p / 100.0 * (v.size() - 1) + 0.5));
  return v[i];
}

}  // namespace kvgate::bench
