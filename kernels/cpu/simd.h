// Per-ISA inner loops of the CPU matrix products. Each ISA's loops live in their own
// translation unit compiled with that ISA's flags (simd_avx2.cc, simd_avx512.cc) and are called
// only after a run-time CPU check. Those units use no inline library code, so no function
// compiled for a wider ISA can leak into the generic code through the linker.
#pragma once

#include <cstdint>

namespace kvgate::kernels::cpu::simd {

// Element type codes (mirror kvgate::DType without including it here).
enum ElemType : int { kElemF32 = 0, kElemF16 = 1, kElemBF16 = 2 };

// out[j] = dot(x, row_j) for the `rows` (1..4) consecutive rows starting at `w`, each `k`
// elements of type `t`.
using DotRowsFn = void (*)(const float* x,  // [k]
                           const void* w,   // [rows, k]
                           int t, int64_t k, int rows,
                           float* out);  // [rows]
// dst = float32(src).
using ConvertRowFn = void (*)(const void* src, int t, int64_t k, float* dst);  // [k] each
// y[a * ldy + b] = dot(x_a, w_b) for a < na (<= Kernels::tile_tokens), b < nb (<= 4), each
// pair computed exactly as dot_rows computes it.
using TileFn = void (*)(const float* x, int64_t ldx,                        // [na, k]
                        const float* w, int64_t ldw,                        // [nb, k]
                        int64_t k, int na, int nb, float* y, int64_t ldy);  // [na, nb]

// TileFn over 16-bit weight rows (type t: bf16 or f16) widened to float32 in registers: the same
// sums as widening the rows first, from half the bytes.
using TileWiden16Fn = void (*)(const float* x, int64_t ldx,                        // [na, k]
                               const void* w, int t, int64_t ldw,                  // [nb, k]
                               int64_t k, int na, int nb, float* y, int64_t ldy);  // [na, nb]

// Quantized weight codes (mirror kvgate::kernels::Quant).
enum QuantCode : int { kQuantQ8_0 = 1, kQuantQ4_0 = 2 };
// out[j] = sum over blocks b of xs[b] * scale(w_j, b) * dot(xq block b, w_j block b) for the
// `rows` (1..4) consecutive block-quantized rows starting at `w`, each `blocks` blocks of 32
// (row layout: kernels/cpu/quant.h). xsum[b]: the sum of xq's block b.
using DotRowsQuantFn = void (*)(const int8_t* xq,   // [blocks * 32]
                                const float* xs,    // [blocks]
                                const float* xsum,  // [blocks]
                                const void* w,      // [rows, blocks] blocks of `quant`
                                int quant, int64_t blocks, int rows,
                                float* out);  // [rows]

// Attention's two inner loops over `count` KV rows of `d` elements of type `t`, rows `stride`
// elements apart (a KV head's view). Scores: out[j] = dot(q, row_j).
using ScoreRowsFn = void (*)(const float* q,  // [d]
                             const void* k,   // [count, stride]
                             int t, int64_t d, int64_t stride, int64_t count,
                             float* out);  // [count]
// Weighted sum: acc[e] += sum_j p[j] * row_j[e].
using AccumulateRowsFn = void (*)(const float* p,  // [count]
                                  const void* v,   // [count, stride]
                                  int t, int64_t d, int64_t stride, int64_t count,
                                  float* acc);  // [d]
// AccumulateRows for `na` (<= Kernels::tile_tokens) rows of probabilities at once, each row
// exactly as accumulate_rows computes it: acc_i[e] += sum_j p_i[j] * row_j[e].
using AccumulateTileFn = void (*)(const float* p, int64_t ldp, int na,  // [na, count]
                                  const void* v,                        // [count, stride]
                                  int t, int64_t d, int64_t stride, int64_t count, float* acc,
                                  int64_t ldacc);  // [na, d]

// dst = the float32 values of one block-quantized row of `blocks` blocks (layout:
// kernels/cpu/quant.h), as DequantizeRow.
using DequantizeRowFn = void (*)(const void* row, int quant, int64_t blocks,
                                 float* dst);  // [blocks * 32]
// Softmax's exponentials: p[j] = exp(p[j] - max) (0 where p[j] is -inf); returns their sum.
// Polynomial exp, relative error ~2e-7.
using ExpSumFn = float (*)(float* p, int64_t count, float max);  // p [count]

// bf16 products with AVX512-BF16's vdpbf16ps (float32 sums of bf16 x bf16 pairs), only at the
// kAvx512Bf16 level (nullptr below it). The activations come already rounded to bf16. Every
// (token, row) dot is computed the same way, alone or in a tile (one accumulator, 32 elements a
// step, the same final sum), so a token's row never depends on how many tokens share the call.
// out[j] = dot(x, row_j) for the `rows` (1..4) consecutive bf16 rows starting at `w`.
using DotRowsBf16Fn = void (*)(const uint16_t* x,  // [k]
                               const uint16_t* w,  // [rows, k]
                               int64_t k, int rows,
                               float* out);  // [rows]
// TileFn's bf16 twin.
using TileBf16Fn = void (*)(const uint16_t* x, int64_t ldx,                     // [na, k]
                            const uint16_t* w, int64_t ldw,                     // [nb, k]
                            int64_t k, int na, int nb, float* y, int64_t ldy);  // [na, nb]
// dst = bf16(src), rounded to nearest even.
using ToBf16Fn = void (*)(const float* src, int64_t k, uint16_t* dst);  // [k] each
// out[i] = silu(gate[i]) * up[i], silu(g) = g / (1 + exp(-g)), exp polynomial as ExpSumFn's.
using SiluMulFn = void (*)(const float* gate, const float* up, int64_t count,
                           float* out);  // [count] each; out may alias gate or up

// PanelTileFn over 16-bit panels (type t: bf16 or f16) widened in registers, for na <= 2 tokens
// (decode): the same bits as PanelTileFn over the widened panels.
using PanelTile16Fn = void (*)(const float* x, int64_t ldx, int na,          // [na, k]
                               const uint16_t* w, int t, int np, int64_t k,  // [np, k, 16]
                               float* y, int64_t ldy, int64_t cols);         // [na, cols]

// Softmax's scaled scores: p[j] *= scale; returns the largest (-inf when count is 0). Exact
// arithmetic, so the same bits as the plain loop.
using ScaleMaxFn = float (*)(float* p, int64_t count, float scale);  // p [count]

// Float32 weights in panels (kernels/tensor.h, Layout::kPanels; panel p is [k, 16] at
// w + p * k * 16): y[a * ldy + j] = sum_i x_a[i] * w(j, i) for a < na (<= Kernels::panel_tokens)
// and j < cols (<= 16 * np). Every output is summed in index order by fused multiply-adds from
// 0, so it is the same bits whatever na, np or the SIMD level (and as the scalar loop in ops.cc).
using PanelTileFn = void (*)(const float* x, int64_t ldx, int na,   // [na, k]
                             const float* w, int np, int64_t k,     // [np, k, 16]
                             float* y, int64_t ldy, int64_t cols);  // [na, cols]

// One panel from rows: panel[c * 16 + r] = rows[r * ld + c] for r < nrows (<= 16), c < k; the
// panel's rows nrows..15 zero.
using RowsToPanelFn = void (*)(const float* rows, int64_t ld, int nrows,  // [nrows, k]
                               int64_t k, float* panel);                  // [k, 16]

struct Kernels {
  DotRowsFn dot_rows;
  ConvertRowFn convert_row;
  TileFn tile;
  DotRowsQuantFn dot_rows_quant;
  ScoreRowsFn score_rows;
  AccumulateRowsFn accumulate_rows;
  ExpSumFn exp_sum;
  DequantizeRowFn dequantize_row;
  TileWiden16Fn tile_widen16 = nullptr;        // nullptr: rows widened first, then tile
  SiluMulFn silu_mul = nullptr;                // nullptr: the plain loop
  AccumulateTileFn accumulate_tile = nullptr;  // nullptr: accumulate_rows row by row
  DotRowsBf16Fn dot_rows_bf16 = nullptr;
  TileBf16Fn tile_bf16 = nullptr;
  ToBf16Fn to_bf16 = nullptr;
  PanelTileFn panel_tile = nullptr;
  PanelTile16Fn panel_tile16 = nullptr;   // nullptr: panels widened first, then panel_tile
  ScaleMaxFn scale_max = nullptr;         // nullptr: the plain loop
  RowsToPanelFn rows_to_panel = nullptr;  // nullptr: the plain loop
  int tile_tokens = 4;                    // the tiles' largest na
  int panel_tokens = 6;                   // panel_tile's largest na
};

Kernels Avx2Kernels();
Kernels Avx512Kernels();
// simd_avx512.cc compiled again with -mavx512vnni (KVGATE_SIMD_VNNI): the quantized dot
// products with vpdpbusd.
Kernels Avx512VnniKernels();
// And once more with -mavx512bf16 as well (KVGATE_SIMD_BF16): the bf16 products above.
Kernels Avx512Bf16Kernels();

}  // namespace kvgate::kernels::cpu::simd
