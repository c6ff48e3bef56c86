#include "model/arch/rope.h"

#include <cmath>

namespace kvgate::model {

RotaryEmbedding::RotaryEmbedding(const ModelConfig& c) : rotary_dim_(c.rotary_dim) {
  const int64_t half = rotary_dim_ / 2;
  std::vector<double> base(static_cast<size_t>(half));
  for (int64_t j = 0; j < half; ++j) {
    base[static_cast<size_t>(j)] =
        1.0 / std::pow(c.rope_theta, static_cast<double>(2 * j) / static_cast<double>(rotary_dim_));
  }
  const RopeScaling& rs = c.rope_scaling;
  inv_freq_ = base;
  switch (rs.type) {
    case RopeType::kDefault:
      break;
    case RopeType::kLinear:
      for (double& f : inv_freq_) f /= rs.factor;
      break;
    case RopeType::kLlama3: {
      const double orig = static_cast<double>(rs.original_max_position_embeddings);
      const double low_wavelen = orig / rs.low_freq_factor;
      const double high_wavelen = orig / rs.high_freq_factor;
      for (double& f : inv_freq_) {
        const double wavelen = 2.0 * M_PI / f;
        if (wavelen > low_wavelen) {
          f = f / rs.factor;
        } else if (wavelen >= high_wavelen) {
          const double smooth =
              (orig / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor);
          f = (1.0 - smooth) * f / rs.factor + smooth * f;
        }
      }
      break;
    }
    case RopeType::kLongRope:
      inv_freq_long_ = base;
      for (int64_t j = 0; j < half; ++j) {
        inv_freq_[static_cast<size_t>(j)] /= rs.short_factor[static_cast<size_t>(j)];
        inv_freq_long_[static_cast<size_t>(j)] /= rs.long_factor[static_cast<size_t>(j)];
      }
      original_max_ = rs.original_max_position_embeddings;
      attention_factor_ = rs.attention_factor;
      break;
  }
}

void RotaryEmbedding::Compute(const int32_t* positions, int64_t n, int64_t seq_len, float* cos,
                              float* sin) const {
  const int64_t half = rotary_dim_ / 2;
  const std::vector<double>& freq =
      (!inv_freq_long_.empty() && seq_len > original_max_) ? inv_freq_long_ : inv_freq_;
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < half; ++j) {
      const double angle = static_cast<double>(positions[i]) * freq[static_cast<size_t>(j)];
      cos[i * half + j] = static_cast<float>(std::cos(angle) * attention_factor_);
      sin[i * half + j] = static_cast<float>(std::sin(angle) * attention_factor_);
    }
  }
}

void RotaryEmbedding::DeltaTable(const int32_t* deltas, int64_t n, float* cos, float* sin) const {
  const int64_t half = rotary_dim_ / 2;
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < half; ++j) {
      const double angle = static_cast<double>(deltas[i]) * inv_freq_[static_cast<size_t>(j)];
      cos[i * half + j] = static_cast<float>(std::cos(angle));
      sin[i * half + j] = static_cast<float>(std::sin(angle));
    }
  }
}

void RotaryEmbedding::Rotate(float* row, int64_t head_dim, int32_t delta) const {
  const int64_t half = rotary_dim_ / 2;
  std::vector<float> c(static_cast<size_t>(half)), s(static_cast<size_t>(half));
  DeltaTable(&delta, 1, c.data(), s.data());
  for (int64_t j = 0; j < half; ++j) {
    const float a = row[j], b = row[j + half];
    row[j] = a * c[static_cast<size_t>(j)] - b * s[static_cast<size_t>(j)];
    row[j + half] = b * c[static_cast<size_t>(j)] + a * s[static_cast<size_t>(j)];
  }
}

}  // namespace kvgate::model
