// Block quantization of weights (q8_0, q4_0; layout in kernels/tensor.h) and the scalar
// reference of their matrix products: weights converted once at load, activations quantized
// per row to int8 blocks at each product, then integer dot products per block scaled by both
// scales. The SIMD loops (simd_avx2.cc, simd_avx512.cc) compute the same sums.
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/tensor.h"

namespace kvgate::kernels::cpu {

// Quantizes `src` [cols] to `quant` blocks at `dst` [cols / kQuantBlock * block bytes].
// q8_0: scale = max|x| / 127, q = round(x / scale); q4_0 (as llama.cpp's): scale = m / -8 with
// m the element of largest magnitude, nibble = clamp(round(x / scale) + 8, 0, 15).
// REQUIRES: cols % kQuantBlock == 0.
void QuantizeRow(const float* src, int64_t cols, Quant quant, uint8_t* dst);
// The inverse: dst [cols] = scale * value.
void DequantizeRow(const uint8_t* src, int64_t cols, Quant quant, float* dst);

// A row of activations as int8 blocks: q [cols], one float scale per block [cols / 32].
struct QuantizedRows {
  std::vector<int8_t> q;     // [n, cols]
  std::vector<float> scale;  // [n, cols / kQuantBlock]
};
// Quantizes x [n, cols] per block of 32 (scale = max|x| / 127).
void QuantizeActivations(const float* x, int64_t n, int64_t cols, QuantizedRows* out);

// Reference: y [n, m] = x . w^T with x quantized per block, w block-quantized [m, cols].
void MatMulQuantReference(const float* x, int64_t n, const WeightView& w, float* y);

}  // namespace kvgate::kernels::cpu
