#include "cache/eviction/attention_gates.h"

#include <algorithm>
#include <cmath>

namespace kvgate::cache {
namespace {

// out[t, r] = sum_i w[r, i] * x[t, i] for a row-major w [rows, cols].
void Project(const float* x, int64_t n, const std::vector<float>& w, int64_t rows, int64_t cols,
             float* out) {
#pragma omp parallel for schedule(static) if (n * rows * cols > 65536)
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t r = 0; r < rows; ++r) {
      const float* wr = w.data() + r * cols;
      float acc = 0.f;
      for (int64_t i = 0; i < cols; ++i) acc += wr[i] * x[t * cols + i];
      out[t * rows + r] = acc;
    }
  }
}

}  // namespace

void AttentionGates::Probabilities(int64_t layer, const float* x, int64_t n,
                                   std::vector<float>& gate_k, std::vector<float>& gate_v,
                                   float* p) const {
  const Layer& L = layers[static_cast<size_t>(layer)];
  const int64_t w = width(), D = hidden_size;
  const int64_t past = static_cast<int64_t>(gate_k.size()) / w;
  std::vector<float> q(static_cast<size_t>(n * w));
  gate_k.resize(static_cast<size_t>((past + n) * w));
  gate_v.resize(gate_k.size());
  Project(x, n, L.wq, w, D, q.data());
  Project(x, n, L.wk, w, D, gate_k.data() + past * w);
  Project(x, n, L.wv, w, D, gate_v.data() + past * w);
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  std::vector<float> o(static_cast<size_t>(n * w));
#pragma omp parallel
  {
    std::vector<float> probs;
#pragma omp for schedule(dynamic, 1)
    for (int64_t job = 0; job < n * heads; ++job) {
      const int64_t t = job / heads, h = job % heads;
      const int64_t keys = past + t + 1;  // causal
      const float* qt = q.data() + t * w + h * head_dim;
      probs.resize(static_cast<size_t>(keys));
      float mx = -INFINITY;
      for (int64_t j = 0; j < keys; ++j) {
        const float* kj = gate_k.data() + j * w + h * head_dim;
        float s = 0.f;
        for (int64_t e = 0; e < head_dim; ++e) s += qt[e] * kj[e];
        probs[static_cast<size_t>(j)] = s * scale;
        mx = std::max(mx, s * scale);
      }
      float sum = 0.f;
      for (float& v : probs) sum += (v = std::exp(v - mx));
      float* ot = o.data() + t * w + h * head_dim;
      std::fill(ot, ot + head_dim, 0.f);
      for (int64_t j = 0; j < keys; ++j) {
        const float pj = probs[static_cast<size_t>(j)] / sum;
        const float* vj = gate_v.data() + j * w + h * head_dim;
        for (int64_t e = 0; e < head_dim; ++e) ot[e] += pj * vj[e];
      }
    }
  }
  Project(o.data(), n, L.wo, num_kv_heads, w, p);
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t j = 0; j < num_kv_heads; ++j) {
      const float logit = p[t * num_kv_heads + j] + L.bo[static_cast<size_t>(j)];
      p[t * num_kv_heads + j] = 1.0f / (1.0f + std::exp(-logit));
    }
  }
}

}  // namespace kvgate::cache
