// Locret retaining heads (EVICTION.md): per layer, score = fc2(silu(fc1(concat(q, k, v)))) over
// the layer's pre-RoPE projections of each token, one score per KV head. The weights are loaded
// by model/weights/eviction_weights.h; this is the data and the CPU reference of the scoring.
#pragma once

#include <cstdint>
#include <vector>

namespace kvgate::cache {

struct LocretHeads {
  int64_t num_layers = 0;
  int64_t num_heads = 0;     // query heads h
  int64_t num_kv_heads = 0;  // n_kv
  int64_t head_dim = 0;      // d
  int64_t d_r = 0;           // hidden size of the heads
  int64_t d_in() const { return (num_heads + 2 * num_kv_heads) * head_dim; }
  std::vector<std::vector<float>> fc1;  // per layer [d_r, d_in]
  std::vector<std::vector<float>> fc2;  // per layer [n_kv, d_r]

  // Scores of `n` tokens of (global) layer `layer`.
  void Score(int64_t layer,
             const float* q,  // [n, num_heads * head_dim], pre-RoPE
             const float* k,  // [n, num_kv_heads * head_dim], pre-RoPE
             const float* v,  // [n, num_kv_heads * head_dim]
             int64_t n,
             float* out) const;  // [n, num_kv_heads]
};

}  // namespace kvgate::cache
