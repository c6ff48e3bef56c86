#include "cache/eviction/locret_heads.h"

#include <cmath>

namespace kvgate::cache {

void LocretHeads::Score(int64_t layer, const float* q, const float* k, const float* v, int64_t n,
                        float* out) const {
  const int64_t qd = num_heads * head_dim, kd = num_kv_heads * head_dim, din = d_in();
  const float* w1 = fc1[static_cast<size_t>(layer)].data();
  const float* w2 = fc2[static_cast<size_t>(layer)].data();
#pragma omp parallel
  {
    std::vector<float> x(static_cast<size_t>(din)), hidden(static_cast<size_t>(d_r));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < n; ++t) {
      float* xp = x.data();
      for (int64_t i = 0; i < qd; ++i) xp[i] = q[t * qd + i];
      for (int64_t i = 0; i < kd; ++i) xp[qd + i] = k[t * kd + i];
      for (int64_t i = 0; i < kd; ++i) xp[qd + kd + i] = v[t * kd + i];
      for (int64_t r = 0; r < d_r; ++r) {
        const float* row = w1 + r * din;
        float acc = 0.f;
        for (int64_t i = 0; i < din; ++i) acc += row[i] * xp[i];
        hidden[static_cast<size_t>(r)] = acc / (1.f + std::exp(-acc));  // SiLU
      }
      for (int64_t j = 0; j < num_kv_heads; ++j) {
        const float* row = w2 + j * d_r;
        float acc = 0.f;
        for (int64_t r = 0; r < d_r; ++r) acc += row[r] * hidden[static_cast<size_t>(r)];
        out[t * num_kv_heads + j] = acc;
      }
    }
  }
}

}  // namespace kvgate::cache
