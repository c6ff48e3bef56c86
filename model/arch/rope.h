// Rotary position embedding tables for every scaling variant of the supported models:
// default, linear, llama3 (Llama 3.1/3.2), longrope / su (Phi-3).
#pragma once

#include <cstdint>
#include <vector>

#include "model/config/model_config.h"

namespace kvgate::model {

class RotaryEmbedding {
 public:
  explicit RotaryEmbedding(const ModelConfig& config);

  int64_t rotary_dim() const { return rotary_dim_; }
  // Fills cos/sin [n, rotary_dim / 2] for `positions` [n]. `seq_len` (the sequence length the
  // step reaches) selects longrope's short or long factors as Hugging Face does.
  void Compute(const int32_t* positions, int64_t n, int64_t seq_len, float* cos, float* sin) const;
  // Rotates one already-rotated key row [head_dim] by `delta` positions (pure rotation, without
  // longrope's attention factor): how the cache moves a key when eviction changes its index
  // under position re-assignment.
  void Rotate(float* row, int64_t head_dim, int32_t delta) const;
  // The tables of that rotation for each of `n` deltas: cos/sin [n, rotary_dim / 2], to apply
  // with the backend's Rope op (re-rotating keys in the cache, ragged-head queries and keys).
  void DeltaTable(const int32_t* deltas, int64_t n, float* cos, float* sin) const;

 private:
  int64_t rotary_dim_;
  std::vector<double> inv_freq_;       // [rotary_dim / 2]
  std::vector<double> inv_freq_long_;  // longrope only
  int64_t original_max_ = 0;           // longrope switch point
  double attention_factor_ = 1.0;
};

}  // namespace kvgate::model
