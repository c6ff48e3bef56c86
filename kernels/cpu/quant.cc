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
  uint8_t* values = dst + 2 * blocks;
  if (quant == Quant::kQ4_0) std::memset(values, 0, static_cast<size_t>(blocks * 16));
  for (int64_t b = 0; b < blocks; ++b) {
    const float* x = src + b * kB;
    if (quant == Quant::kQ8_0) {
      float amax = 0;
      for (int64_t j = 0; j < kB; ++j) amax = std::max(amax, std::fabs(x[j]));
      const uint16_t h = ToHalf(amax / 127.f);
      std::memcpy(dst + 2 * b, &h, 2);
      const float d = F16ToF32(h);  // the stored scale, so values round-trip against it
      const float inv = d != 0 ? 1.f / d : 0.f;
      for (int64_t j = 0; j < kB; ++j) {
        const float q = std::nearbyint(x[j] * inv);
        values[b * kB + j] =
            static_cast<uint8_t>(static_cast<int8_t>(std::clamp(q, -127.f, 127.f)));
      }
    } else {
      float m = 0;
      for (int64_t j = 0; j < kB; ++j) {
        if (std::fabs(x[j]) > std::fabs(m)) m = x[j];
      }
      const uint16_t h = ToHalf(m / -8.f);
      std::memcpy(dst + 2 * b, &h, 2);
      const float d = F16ToF32(h);
      const float inv = d != 0 ? 1.f / d : 0.f;
      for (int64_t j = 0; j < kB; ++j) {
        const int q = static_cast<int>(std::clamp(std::nearbyint(x[j] * inv) + 8.f, 0.f, 15.f));
        bool high = false;
        const int64_t at = Q4ByteOf(blocks, b, j, &high);
        values[at] = static_cast<uint8_t>(values[at] | (high ? q << 4 : q));
      }
    }
  }
}

namespace {

// Block b's 32 values as integers (q4_0: the nibbles less 8) and its scale.
float LoadBlock(const uint8_t* row, int64_t blocks, int64_t b, Quant quant, int32_t* v) {
  const uint8_t* values = QuantValues(row, blocks);
  for (int64_t j = 0; j < kB; ++j) {
    if (quant == Quant::kQ8_0) {
      v[j] = static_cast<int8_t>(values[b * kB + j]);
    } else {
      bool high = false;
      const uint8_t byte = values[Q4ByteOf(blocks, b, j, &high)];
      v[j] = (high ? byte >> 4 : byte & 0x0f) - 8;
    }
  }
  return FromHalf(row + 2 * b);
}

}  // namespace

void DequantizeRow(const uint8_t* src, int64_t cols, Quant quant, float* dst) {
  const int64_t blocks = cols / kB;
  int32_t v[kB];
  for (int64_t b = 0; b < blocks; ++b) {
    const float d = LoadBlock(src, blocks, b, quant, v);
    for (int64_t j = 0; j < kB; ++j) dst[b * kB + j] = d * static_cast<float>(v[j]);
  }
}

void QuantizeActivations(const float* x, int64_t n, int64_t cols, QuantizedRows* out) {
  const int64_t blocks = cols / kB;
  out->q.resize(static_cast<size_t>(n * cols));
  out->scale.resize(static_cast<size_t>(n * blocks));
  out->sum.resize(static_cast<size_t>(n * blocks));
  for (int64_t b = 0; b < n * blocks; ++b) {
    const float* v = x + b * kB;
    float amax = 0;
    for (int64_t j = 0; j < kB; ++j) amax = std::max(amax, std::fabs(v[j]));
    const float d = amax / 127.f;
    const float inv = d != 0 ? 1.f / d : 0.f;
    out->scale[static_cast<size_t>(b)] = d;
    int32_t sum = 0;
    for (int64_t j = 0; j < kB; ++j) {
      const auto q = static_cast<int8_t>(std::nearbyint(v[j] * inv));
      out->q[static_cast<size_t>(b * kB + j)] = q;
      sum += q;
    }
    out->sum[static_cast<size_t>(b)] = static_cast<float>(sum);
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
        int32_t v[kB];
        const float d = LoadBlock(row, blocks, b, w.quant, v);
        int32_t sum = 0;
        for (int64_t j = 0; j < kB; ++j) sum += a[j] * v[j];
        acc += d * xq.scale[static_cast<size_t>(i * blocks + b)] * static_cast<float>(sum);
      }
      y[i * m + r] = acc;
    }
  }
}

}  // namespace kvgate::kernels::cpu
