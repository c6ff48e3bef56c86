#include "kernels/cpu/quant.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "common/dtype.h"

namespace kvgate::kernels::cpu {
namespace {

constexpr int64_t kB = kQuantBlock;

uint16_t ToHalf(float f) { return F32ToF16(f); }
float FromHalf(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return F16ToF32(h);
}

}  // namespace

void QuantizeRow(const float* src, int64_t cols, Quant quant, uint8_t* dst) {
  const int64_t blocks = cols / kB;
  for (int64_t b = 0; b < blocks; ++b) {
    const float* x = src + b * kB;
    if (quant == Quant::kQ8_0) {
      uint8_t* out = dst + b * 34;
      float amax = 0;
      for (int64_t j = 0; j < kB; ++j) amax = std::max(amax, std::fabs(x[j]));
      const uint16_t h = ToHalf(amax / 127.f);
      std::memcpy(out, &h, 2);
      const float d = F16ToF32(h);  // the stored scale, so values round-trip against it
      const float inv = d != 0 ? 1.f / d : 0.f;
      for (int64_t j = 0; j < kB; ++j) {
        const float q = std::nearbyint(x[j] * inv);
        out[2 + j] = static_cast<uint8_t>(static_cast<int8_t>(std::clamp(q, -127.f, 127.f)));
      }
    } else {
      uint8_t* out = dst + b * 18;
      float m = 0;
      for (int64_t j = 0; j < kB; ++j) {
        if (std::fabs(x[j]) > std::fabs(m)) m = x[j];
      }
      const uint16_t h = ToHalf(m / -8.f);
      std::memcpy(out, &h, 2);
      const float d = F16ToF32(h);
      const float inv = d != 0 ? 1.f / d : 0.f;
      for (int64_t j = 0; j < kB / 2; ++j) {
        const int lo = static_cast<int>(std::clamp(std::nearbyint(x[j] * inv) + 8.f, 0.f, 15.f));
        const int hi =
            static_cast<int>(std::clamp(std::nearbyint(x[j + kB / 2] * inv) + 8.f, 0.f, 15.f));
        out[2 + j] = static_cast<uint8_t>(lo | (hi << 4));
      }
    }
  }
}

void DequantizeRow(const uint8_t* src, int64_t cols, Quant quant, float* dst) {
  const int64_t blocks = cols / kB;
  for (int64_t b = 0; b < blocks; ++b) {
    float* y = dst + b * kB;
    if (quant == Quant::kQ8_0) {
      const uint8_t* in = src + b * 34;
      const float d = FromHalf(in);
      for (int64_t j = 0; j < kB; ++j)
        y[j] = d * static_cast<float>(static_cast<int8_t>(in[2 + j]));
    } else {
      const uint8_t* in = src + b * 18;
      const float d = FromHalf(in);
      for (int64_t j = 0; j < kB / 2; ++j) {
        y[j] = d * static_cast<float>((in[2 + j] & 0x0f) - 8);
        y[j + kB / 2] = d * static_cast<float>((in[2 + j] >> 4) - 8);
      }
    }
  }
}

void QuantizeActivations(const float* x, int64_t n, int64_t cols, QuantizedRows* out) {
  const int64_t blocks = cols / kB;
  out->q.resize(static_cast<size_t>(n * cols));
  out->scale.resize(static_cast<size_t>(n * blocks));
  for (int64_t b = 0; b < n * blocks; ++b) {
    const float* v = x + b * kB;
    float amax = 0;
    for (int64_t j = 0; j < kB; ++j) amax = std::max(amax, std::fabs(v[j]));
    const float d = amax / 127.f;
    const float inv = d != 0 ? 1.f / d : 0.f;
    out->scale[static_cast<size_t>(b)] = d;
    for (int64_t j = 0; j < kB; ++j) {
      out->q[static_cast<size_t>(b * kB + j)] = static_cast<int8_t>(std::nearbyint(v[j] * inv));
    }
  }
}

void MatMulQuantReference(const float* x, int64_t n, const WeightView& w, float* y) {
  const int64_t m = w.rows, k = w.cols, blocks = k / kB;
  QuantizedRows xq;
  QuantizeActivations(x, n, k, &xq);
  for (int64_t r = 0; r < m; ++r) {
    const uint8_t* row = static_cast<const uint8_t*>(w.row(r));
    for (int64_t i = 0; i < n; ++i) {
      float acc = 0;
      for (int64_t b = 0; b < blocks; ++b) {
        const int8_t* a = xq.q.data() + i * k + b * kB;
        int32_t sum = 0;
        float d;
        if (w.quant == Quant::kQ8_0) {
          const uint8_t* blk = row + b * 34;
          d = FromHalf(blk);
          for (int64_t j = 0; j < kB; ++j) sum += a[j] * static_cast<int8_t>(blk[2 + j]);
        } else {
          const uint8_t* blk = row + b * 18;
          d = FromHalf(blk);
          for (int64_t j = 0; j < kB / 2; ++j) {
            sum += a[j] * ((blk[2 + j] & 0x0f) - 8) + a[j + kB / 2] * ((blk[2 + j] >> 4) - 8);
          }
        }
        acc += d * xq.scale[static_cast<size_t>(i * blocks + b)] * static_cast<float>(sum);
      }
      y[i * m + r] = acc;
    }
  }
}

}  // namespace kvgate::kernels::cpu
