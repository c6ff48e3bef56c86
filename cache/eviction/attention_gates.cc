#include "cache/eviction/attention_gates.h"

#include "kernels/cpu/ops.h"

namespace kvgate::cache {

void AttentionGates::Probabilities(int64_t layer, const float* x, int64_t n,
                                   std::vector<float>& gate_k, std::vector<float>& gate_v,
                                   float* p) const {
  const Layer& L = layers[static_cast<size_t>(layer)];
  const int64_t w = width(), D = hidden_size;
  const int64_t past = static_cast<int64_t>(gate_k.size()) / w;
  gate_k.resize(static_cast<size_t>((past + n) * w));
  gate_v.resize(gate_k.size());
  kernels::GateLayerWeights g;
  g.wq = kernels::WeightView{L.wq.data(), DType::kF32, w, D};
  g.wk = kernels::WeightView{L.wk.data(), DType::kF32, w, D};
  g.wv = kernels::WeightView{L.wv.data(), DType::kF32, w, D};
  g.wo = kernels::WeightView{L.wo.data(), DType::kF32, num_kv_heads, w};
  g.bo = kernels::WeightView{L.bo.data(), DType::kF32, 1, num_kv_heads};
  g.heads = heads;
  g.head_dim = head_dim;
  kernels::cpu::GateProbabilities(g, x, n, D, num_kv_heads, gate_k.data(), gate_v.data(), past, p);
}

}  // namespace kvgate::cache
