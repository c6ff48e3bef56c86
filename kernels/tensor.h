// Views over tensors the kernels read. Dimension glossary used in every shape comment:
// num_tokens (n), hidden_size, num_heads (h), num_kv_heads (n_kv), head_dim (d),
// rotary_dim, intermediate_size, vocab_size, len (retained tokens of a KV head).
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace kvgate::kernels {

// Block-quantized weights (kernels/cpu/quant.h): each row is cols / kQuantBlock blocks of
// kQuantBlock weights with one scale. q8_0: an f16 scale and 32 int8 (34 bytes); q4_0: an f16
// scale and 32 4-bit values stored as 16 bytes, value = scale * (nibble - 8) (18 bytes). Within
// a row the scales come first, then the values, laid out for 512-bit loads (kernels/cpu/quant.h).
enum class Quant : uint8_t { kNone, kQ8_0, kQ4_0 };
inline constexpr int64_t kQuantBlock = 32;
inline int64_t QuantBlockBytes(Quant q) {
  return q == Quant::kQ8_0 ? 34 : q == Quant::kQ4_0 ? 18 : 0;
}

// How a matrix's elements are laid out. kRows: row-major. kPanels: the CPU backend's layout
// for its matrix products (kernels/cpu/ops.h, PackPanels): the rows in groups of kPanelRows
// (the last group padded with zero rows), each group stored column by column, so that element
// (r, c) is at ((r / kPanelRows) * cols + c) * kPanelRows + r % kPanelRows.
enum class Layout : uint8_t { kRows, kPanels };
inline constexpr int64_t kPanelRows = 16;

// A weight matrix [rows, cols] (a vector is [1, cols]) in its stored dtype, or block-quantized
// (`quant`; then `dtype` is what it was quantized from, for reports); row-major unless `layout`
// says panels (unquantized only).
// REQUIRES: data is aligned to the element size; quantized: cols % kQuantBlock == 0.
struct WeightView {
  const void* data = nullptr;
  DType dtype = DType::kF32;
  int64_t rows = 0;
  int64_t cols = 0;
  Quant quant = Quant::kNone;
  Layout layout = Layout::kRows;

  bool empty() const { return data == nullptr; }
  // REQUIRES (row_bytes, row, Rows): layout == kRows.
  int64_t row_bytes() const {
    return quant == Quant::kNone ? cols * static_cast<int64_t>(DTypeSize(dtype))
                                 : cols / kQuantBlock * QuantBlockBytes(quant);
  }
  int64_t bytes() const {
    if (layout == Layout::kPanels) {
      return (rows + kPanelRows - 1) / kPanelRows * kPanelRows * cols *
             static_cast<int64_t>(DTypeSize(dtype));
    }
    return rows * row_bytes();
  }
  // Row `r` of the matrix.
  const void* row(int64_t r) const { return static_cast<const uint8_t*>(data) + r * row_bytes(); }
  // Rows [first, first + count) as a matrix of their own.
  WeightView Rows(int64_t first, int64_t count) const {
    return WeightView{row(first), dtype, count, cols, quant};
  }
};

// The retained tokens of one (layer, KV head) of one sequence, in cache order, in backend
// memory. K and V rows are stored in `dtype` (float32, or bf16 / f16 under --kv-dtype).
struct KvHeadView {
  const void* k = nullptr;  // [len, d] of dtype, rows `stride` elements apart
  const void* v = nullptr;  // [len, d] of dtype, rows `stride` elements apart
  int64_t len = 0;
  int64_t stride = 0;
  // Attention-Gate: for the step's n new tokens (the last n keys), 0 hides that key from the
  // step's later queries (a token still attends to itself); nullptr: all visible.
  const uint8_t* new_visible = nullptr;  // [n], backend memory
  DType dtype = DType::kF32;
};

// Where one (layer, KV head)'s next rows go: the first free row of its K and V storage.
struct KvHeadSlot {
  void* k = nullptr;  // [.., d] of dtype
  void* v = nullptr;  // [.., d] of dtype
  DType dtype = DType::kF32;
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

// One sequence of a batched attention call: its rows [offset, offset + n) of the step's
// queries, its KV heads' views (a host array of num_kv_heads views over backend memory) and,
// when its policy reads it, the attention-mass side output (mass->mass in backend memory).
struct AttentionSeq {
  int64_t offset = 0;
  int64_t n = 0;
  const KvHeadView* kv = nullptr;       // [num_kv_heads], host array
  const AttentionMass* mass = nullptr;  // host struct, or nullptr: none
};

// Locret's retaining head of one layer, in backend memory (float32).
struct LocretLayerWeights {
  WeightView fc1;      // [d_r, (num_heads + 2 num_kv_heads) head_dim]
  WeightView fc2;      // [num_kv_heads, d_r]
  int64_t kv_dim = 0;  // num_kv_heads * head_dim (d_in = q_dim + 2 kv_dim)
};

// Attention-Gate's gate of one layer, in backend memory (float32).
struct GateLayerWeights {
  WeightView wq, wk, wv;  // [heads * head_dim, hidden_size]
  WeightView wo;          // [num_kv_heads, heads * head_dim]
  WeightView bo;          // [num_kv_heads]
  int64_t heads = 0;
  int64_t head_dim = 0;
};

}  // namespace kvgate::kernels
