// Attention-Gate gates (EVICTION.md): per layer, a reduced causal multi-head attention over the
// layer's normalized input (`heads` heads of `head_dim`, no positional encoding), projected to
// one logit per KV head plus a bias; p = sigmoid(logit), keep flag = p > tau. The weights are
// loaded by model/weights/eviction_weights.h; this is the data and the CPU reference.
#pragma once

#include <cstdint>
#include <vector>

namespace kvgate::cache {

struct AttentionGates {
  int64_t num_layers = 0;
  int64_t hidden_size = 0;   // D
  int64_t num_kv_heads = 0;  // n_kv
  int64_t heads = 0;         // H_ag
  int64_t head_dim = 0;      // d_ag
  float tau = 0.5f;
  int64_t width() const { return heads * head_dim; }
  struct Layer {
    std::vector<float> wq, wk, wv;  // [H_ag * d_ag, D]
    std::vector<float> wo;          // [n_kv, H_ag * d_ag]
    std::vector<float> bo;          // [n_kv]
  };
  std::vector<Layer> layers;

  // Keep probabilities of `n` new tokens of (global) layer `layer`. `gate_k`/`gate_v` hold the
  // gate's keys and values of every earlier token of the sequence ([past, H_ag * d_ag] each);
  // the new tokens' are appended to them.
  void Probabilities(int64_t layer,
                     const float* x,  // [n, D], the layer's normalized input
                     int64_t n, std::vector<float>& gate_k, std::vector<float>& gate_v,
                     float* p) const;  // [n, n_kv]
};

}  // namespace kvgate::cache
