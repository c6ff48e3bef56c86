// Views over tensors the kernels read. Dimension glossary used in every shape comment:
// num_tokens (n), hidden_size, num_heads (h), num_kv_heads (n_kv), head_dim (d),
// rotary_dim, intermediate_size, vocab_size, len (retained tokens of a KV head).
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace kvgate::kernels {

// A row-major weight matrix [rows, cols] (a vector is [1, cols]) in its stored dtype.
// REQUIRES: data is aligned to the element size.
struct WeightView {
  const void* data = nullptr;
  DType dtype = DType::kF32;
  int64_t rows = 0;
  int64_t cols = 0;

  bool empty() const { return data == nullptr; }
  // Row `r` of the matrix.
  const void* row(int64_t r) const {
    return static_cast<const uint8_t*>(data) + r * cols * static_cast<int64_t>(DTypeSize(dtype));
  }
  // Rows [first, first + count) as a matrix of their own.
  WeightView Rows(int64_t first, int64_t count) const {
    return WeightView{row(first), dtype, count, cols};
  }
};

// The retained tokens of one (layer, KV head) of one sequence, in cache order.
struct KvHeadView {
  const float* k = nullptr;  // [len, d], rows `stride` floats apart
  const float* v = nullptr;  // [len, d], rows `stride` floats apart
  int64_t len = 0;
  int64_t stride = 0;
  // Attention-Gate: for the step's n new tokens (the last n keys), 0 hides that key from the
  // step's later queries (a token still attends to itself); nullptr: all visible.
  const uint8_t* new_visible = nullptr;  // [n]
};

// Optional side output of attention for the eviction policies that need it (H2O, SnapKV,
// TOVA): per KV head, the softmax probability each cached key receives from the queries
// [first_query, n) of the step, summed over those queries and over the query heads of the KV
// head's group. Entries [0, len) of each head's row are written. When no policy asks for it,
// attention is given nullptr and pays nothing.
struct AttentionMass {
  float* mass = nullptr;  // [num_kv_heads, stride]
  int64_t stride = 0;
  int64_t first_query = 0;
};

}  // namespace kvgate::kernels
