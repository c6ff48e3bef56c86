// Block quantization of weights (q8_0, q4_0; layout in kernels/tensor.h) and the scalar
// reference of their matrix products: weights converted once at load, activations quantized
// per row to int8 blocks at each product, then integer dot products per block scaled by both
// scales. The SIMD loops (simd_avx2.cc, simd_avx512.cc) compute the same sums.
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/tensor.h"

namespace kvgate::kernels::cpu {

// A row of `blocks` blocks: the f16 scales [blocks x 2 bytes], then the values. q8_0: 32 int8
// per block, in order. q4_0: each chunk of 4 whole blocks (128 weights) as 64 bytes, byte j
// holding weight j in its low nibble and weight 64 + j in its high nibble (one 512-bit load
// feeds two 64-lane products); the last blocks % 4 blocks as 16 bytes each, byte j holding
// weight j (low) and 16 + j (high), as llama.cpp's q4_0.
inline const uint8_t* QuantValues(const uint8_t* row, int64_t blocks) { return row + 2 * blocks; }
// Where block b's q4_0 element e (0..31) lives: byte offset from QuantValues, high nibble or not.
inline int64_t Q4ByteOf(int64_t blocks, int64_t b, int64_t e, bool* high) {
  const int64_t chunked = blocks / 4 * 4;
  if (b < chunked) {
    const int64_t w = (b % 4) * 32 + e;  // weight within its chunk of 128
    *high = w >= 64;
    return b / 4 * 64 + w % 64;
  }
  *high = e >= 16;
  return chunked * 16 + (b - chunked) * 16 + e % 16;
}

// Quantizes `src` [cols] to `quant` blocks at `dst` [cols / kQuantBlock * block bytes].
// q8_0: scale = max|x| / 127, q = round(x / scale); q4_0 (as llama.cpp's): scale = m / -8 with
// m the element of largest magnitude, nibble = clamp(round(x / scale) + 8, 0, 15).
// REQUIRES: cols % kQuantBlock == 0.
void QuantizeRow(const float* src, int64_t cols, Quant quant, uint8_t* dst);
// The inverse: dst [cols] = scale * value.
void DequantizeRow(const uint8_t* src, int64_t cols, Quant quant, float* dst);

// A row of activations as int8 blocks: q [cols], one float scale per block [cols / 32], and
// each block's sum of q (q4_0's products take the nibbles unsigned and subtract 8 x the sum).
struct QuantizedRows {
  std::vector<int8_t> q;     // [n, cols]
  std::vector<float> scale;  // [n, cols / kQuantBlock]
  std::vector<float> sum;    // [n, cols / kQuantBlock]
};
// Quantizes x [n, cols] per block of 32 (scale = max|x| / 127).
void QuantizeActivations(const float* x, int64_t n, int64_t cols, QuantizedRows* out);

// Reference: y [n, m] = x . w^T with x quantized per block, w block-quantized [m, cols].
void MatMulQuantReference(const float* x, int64_t n, const WeightView& w, float* y);

}  // namespace kvgate::kernels::cpu
