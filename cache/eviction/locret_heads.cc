#include "cache/eviction/locret_heads.h"

#include "kernels/cpu/ops.h"

namespace kvgate::cache {

void LocretHeads::Score(int64_t layer, const float* q, const float* k, const float* v, int64_t n,
                        float* out) const {
  const size_t l = static_cast<size_t>(layer);
  kernels::LocretLayerWeights w;
  w.fc1 = kernels::WeightView{fc1[l].data(), DType::kF32, d_r, d_in()};
  w.fc2 = kernels::WeightView{fc2[l].data(), DType::kF32, num_kv_heads, d_r};
  w.kv_dim = num_kv_heads * head_dim;
  kernels::cpu::LocretScore(w, q, k, v, n, num_kv_heads, out);
}

}  // namespace kvgate::cache
