#include "kernels/cpu/ops.h"

#include <cpuid.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <string_view>
#include <tuple>
#include <vector>

#include "common/status.h"
#include "kernels/cpu/quant.h"
#include "kernels/cpu/simd.h"
#include "kernels/cpu/thread_pool.h"

namespace kvgate::kernels::cpu {
namespace {

SimdLevel DetectSimdLevel() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma")) {
    if (!__builtin_cpu_supports("avx512vnni")) return SimdLevel::kAvx512;
    return __builtin_cpu_supports("avx512bf16") ? SimdLevel::kAvx512Bf16 : SimdLevel::kAvx512Vnni;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return SimdLevel::kAvx2;
  return SimdLevel::kScalar;
}

std::atomic<int> g_forced_level{-1};

// Whether bf16 weights multiply bf16-rounded activations (SetBf16Products); from the
// environment's KVGATE_BF16_PRODUCTS=1 until set.
std::atomic<bool> g_bf16_products{[] {
  const char* v = std::getenv("KVGATE_BF16_PRODUCTS");
  return v != nullptr && std::string_view(v) == "1";
}()};

int ElemCode(DType t) {
  switch (t) {
    case DType::kF32:
      return simd::kElemF32;
    case DType::kF16:
      return simd::kElemF16;
    case DType::kBF16:
      return simd::kElemBF16;
  }
  return simd::kElemF32;
}

// Plain reference: float32 accumulation in index order.
void MatMulScalar(const float* x, int64_t n, const WeightView& w, float* y) {
  const int64_t m = w.rows, k = w.cols;
  ParallelFor(m, Schedule::kStatic, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> row;
    row.resize(static_cast<size_t>(k));
    for (int64_t r = begin; r < end; ++r) {
      ConvertToF32(w.dtype, w.row(r), row.data(), static_cast<size_t>(k));
      for (int64_t i = 0; i < n; ++i) {
        const float* xi = x + i * k;
        float acc = 0.f;
        for (int64_t j = 0; j < k; ++j) acc += xi[j] * row[static_cast<size_t>(j)];
        y[i * m + r] = acc;
      }
    }
  });
}

// y [n, m] = x [n, k] . w^T, compute-bound, for element types TX, TW (float, or 16-bit bits):
// blocks of 16 or 64 weight rows, each block's values from `block(r0, rows, scratch)` (the stored
// rows themselves, or rows converted into the per-thread `scratch`, which the callback sizes),
// reused for every token by `tile` (kern.tile_tokens tokens x 4 rows).
template <typename TX, typename TW, typename Tile, typename Block>
void BlockedTiles(const simd::Kernels& kern, const TX* x, int64_t n, int64_t m, int64_t k, float* y,
                  const Tile& tile, const Block& block) {
  // Each block streams all of x past its rows: where x outgrows L2's share (1 MiB), blocks of
  // 64 rows cut that traffic by four (1.1B prefill at 512 tokens +13% against 16 rows); small
  // products keep 16 rows for balance among the threads (the default model: 64 is 7% slower).
  const int64_t kRowBlock = n * k * static_cast<int64_t>(sizeof(TX)) > (int64_t{1} << 20) ? 64 : 16;
  const int64_t blocks = (m + kRowBlock - 1) / kRowBlock;
  const int64_t step = kern.tile_tokens;
  ParallelFor(blocks, Schedule::kDynamic, [&](int64_t begin, int64_t end) {
    thread_local std::vector<TW> scratch;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t r0 = b * kRowBlock;
      const int64_t rows = std::min<int64_t>(kRowBlock, m - r0);
      const TW* wb = block(r0, rows, scratch);  // rows [r0, r0 + rows), k apart
      for (int64_t i0 = 0, na = 0; i0 < n; i0 += na) {
        // Full tiles, but the last one or two tokens share two narrower tiles instead of
        // running as a tile of their own (a 6 x 4 tile and a 2 x 4 cost more than two 4 x 4).
        const int64_t left = n - i0;
        na = left > step && left <= step + 2 && step > 4 ? 4 : std::min(step, left);
        for (int64_t c0 = 0; c0 < rows; c0 += 4) {
          const int nb = static_cast<int>(std::min<int64_t>(4, rows - c0));
          tile(x + i0 * k, k, wb + c0 * k, k, k, static_cast<int>(na), nb, y + i0 * m + r0 + c0, m);
        }
      }
    }
  });
}

// Decode: y [n, m] filled group by group of 4 weight rows (the last may be shorter), the groups
// split among the threads; `dot(i, r0, rows, out [rows])` computes token i against one group.
template <typename DotGroup>
void MatVecRowGroups(int64_t n, int64_t m, float* y, const DotGroup& dot) {
  ParallelFor((m + 3) / 4, Schedule::kStatic, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const int64_t r0 = g * 4;
      const int rows = static_cast<int>(std::min<int64_t>(4, m - r0));
      float out[4];
      for (int64_t i = 0; i < n; ++i) {
        dot(i, r0, rows, out);
        for (int j = 0; j < rows; ++j) y[i * m + r0 + j] = out[j];
      }
    }
  });
}

// PanelTileFn's plain loop (kScalar): each output summed in index order by fused multiply-adds
// from 0, as the SIMD panel tiles sum it.
void PanelTileScalar(const float* x, int64_t ldx, int na, const float* w, int np, int64_t k,
                     float* y, int64_t ldy, int64_t cols) {
  for (int a = 0; a < na; ++a) {
    for (int64_t j = 0; j < cols && j < np * kPanelRows; ++j) {
      const float* col = w + j / kPanelRows * k * kPanelRows + j % kPanelRows;
      float acc = 0.f;
      for (int64_t c = 0; c < k; ++c) acc = std::fma(x[a * ldx + c], col[c * kPanelRows], acc);
      y[a * ldy + j] = acc;
    }
  }
}

// RowsToPanelFn's plain loop.
void RowsToPanelScalar(const float* rows, int64_t ld, int nrows, int64_t k, float* panel) {
  for (int64_t c = 0; c < k; ++c) {
    for (int r = 0; r < kPanelRows; ++r) {
      panel[c * kPanelRows + r] = r < nrows ? rows[r * ld + c] : 0.f;
    }
  }
}

// The panel loops of the active level, or the plain ones at kScalar.
struct PanelLoops {
  simd::PanelTileFn tile = &PanelTileScalar;
  simd::RowsToPanelFn rows_to_panel = &RowsToPanelScalar;
  int tokens = 6;
};

PanelLoops PanelLoopsOf(const simd::Kernels* kern) {
  PanelLoops loops;
  if (kern != nullptr && kern->panel_tile != nullptr) {
    loops.tile = kern->panel_tile;
    loops.tokens = kern->panel_tokens;
  }
  if (kern != nullptr && kern->rows_to_panel != nullptr) loops.rows_to_panel = kern->rows_to_panel;
  return loops;
}

// Splits the panels of a product with m output rows among the threads and calls
// group(p0, p1) for panels [p0, p1). One or two tokens (decode, memory-bound): the panels split
// evenly, in calls of at most 8. More: groups of 4 panels (64 rows) handed out dynamically, each
// to be multiplied by every token tile in turn while its panels sit in L2.
template <typename Group>
void ForPanelGroups(int64_t n, int64_t m, const Group& group) {
  const int64_t total = (m + kPanelRows - 1) / kPanelRows;
  if (n <= 2) {
    ParallelFor(total, Schedule::kStatic, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; p += 8) group(p, std::min(end, p + 8));
    });
    return;
  }
  constexpr int64_t kGroup = 4;
  ParallelFor((total + kGroup - 1) / kGroup, Schedule::kDynamic, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) group(g * kGroup, std::min(total, (g + 1) * kGroup));
  });
}

// y rows of all n tokens for panels [p0, p1) of an [m, k] product, the panels float32 at wp,
// in tiles of loops.tokens tokens.
void PanelTiles(const PanelLoops& loops, const float* x, int64_t n, int64_t m, int64_t k,
                int64_t p0, int64_t p1, const float* wp, float* y) {
  const int64_t cols = std::min(m - p0 * kPanelRows, (p1 - p0) * kPanelRows);
  for (int64_t i0 = 0, na = 0; i0 < n; i0 += na) {
    na = std::min<int64_t>(loops.tokens, n - i0);
    loops.tile(x + i0 * k, k, static_cast<int>(na), wp, static_cast<int>(p1 - p0), k,
               y + i0 * m + p0 * kPanelRows, m, cols);
  }
}

// Weights stored in panels (PackPanels). Float32 panels are read in place. 16-bit ones are
// widened in the tiles' registers for one or two tokens (decode: memory-bound, the bytes read
// as stored) and widened into float32 once per group for more (prefill: each group reused by
// every token); the widening is exact, so both give the float32 tiles' bits.
void MatMulPanels(const simd::Kernels* kern, const float* x, int64_t n, const WeightView& w,
                  float* y) {
  const PanelLoops loops = PanelLoopsOf(kern);
  const int64_t m = w.rows, k = w.cols, stride = k * kPanelRows;
  const int t = ElemCode(w.dtype);
  ForPanelGroups(n, m, [&](int64_t p0, int64_t p1) {
    if (w.dtype == DType::kF32) {
      PanelTiles(loops, x, n, m, k, p0, p1, static_cast<const float*>(w.data) + p0 * stride, y);
      return;
    }
    const auto* src = static_cast<const uint16_t*>(w.data) + p0 * stride;
    if (n <= 2 && kern != nullptr && kern->panel_tile16 != nullptr) {
      kern->panel_tile16(x, k, static_cast<int>(n), src, t, static_cast<int>(p1 - p0), k,
                         y + p0 * kPanelRows, m,
                         std::min(m - p0 * kPanelRows, (p1 - p0) * kPanelRows));
      return;
    }
    thread_local std::vector<float> widened;
    const int64_t count = (p1 - p0) * stride;
    widened.resize(static_cast<size_t>(count));
    if (kern != nullptr) {
      kern->convert_row(src, t, count, widened.data());
    } else {
      ConvertToF32(w.dtype, src, widened.data(), static_cast<size_t>(count));
    }
    PanelTiles(loops, x, n, m, k, p0, p1, widened.data(), y);
  });
}

// Block-quantized weights, prefill (many tokens, float32 activations): each group of panels
// dequantized (SIMD where there is one) and repacked once, then the float panel tiles for every
// token, so the result is bit for bit the float32 panels product over the dequantized rows.
void MatMulQuantPanels(const simd::Kernels* kern, const float* x, int64_t n, const WeightView& w,
                       float* y) {
  const int64_t m = w.rows, k = w.cols, blocks = k / kQuantBlock;
  const int code = w.quant == Quant::kQ8_0 ? simd::kQuantQ8_0 : simd::kQuantQ4_0;
  const PanelLoops loops = PanelLoopsOf(kern);
  ForPanelGroups(n, m, [&](int64_t p0, int64_t p1) {
    thread_local std::vector<float> rows, panels;
    rows.resize(static_cast<size_t>(kPanelRows * k));
    panels.resize(static_cast<size_t>((p1 - p0) * k * kPanelRows));
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t r0 = p * kPanelRows;
      const int nrows = static_cast<int>(std::min(kPanelRows, m - r0));
      for (int r = 0; r < nrows; ++r) {
        float* dst = rows.data() + r * k;
        if (kern != nullptr) {
          kern->dequantize_row(w.row(r0 + r), code, blocks, dst);
        } else {
          DequantizeRow(static_cast<const uint8_t*>(w.row(r0 + r)), k, w.quant, dst);
        }
      }
      loops.rows_to_panel(rows.data(), k, nrows, k, panels.data() + (p - p0) * k * kPanelRows);
    }
    PanelTiles(loops, x, n, m, k, p0, p1, panels.data(), y);
  });
}

// Block-quantized weights with at most this many tokens take the int8 products (decode);
// more (prefill) dequantize rows once for all tokens (MatMulQuantPanels).
constexpr int64_t kQuantIntegerMaxTokens = 4;

// Whether MatMul takes the bf16 products for `w` and `n` tokens (MatMulRoundsActivationsToBf16).
bool UsesBf16Products(const simd::Kernels& kern, const WeightView& w, int64_t n) {
  if (kern.tile_bf16 == nullptr || !Bf16Products() || w.layout != Layout::kRows) return false;
  return w.quant != Quant::kNone ? n > kQuantIntegerMaxTokens : w.dtype == DType::kBF16;
}

// bf16 products (kernels with tile_bf16 only). x [n, k] is rounded to bf16 once; then blocks of
// weight rows from `row(r0, rows, scratch)` (the stored rows themselves, or rows converted into
// `scratch`) through BlockedTiles. n <= 2 streams the rows once per token (decode) through
// dot_rows_bf16, which computes each (token, row) dot exactly as the tiles do.
template <typename RowBf16>
void MatMulBf16(const simd::Kernels& kern, const float* x, int64_t n, int64_t m, int64_t k,
                float* y, const RowBf16& row) {
  thread_local std::vector<uint16_t> xb;
  xb.resize(static_cast<size_t>(n * k));
  for (int64_t i = 0; i < n; ++i) kern.to_bf16(x + i * k, k, xb.data() + i * k);
  const uint16_t* xs = xb.data();
  if (n <= 2) {
    MatVecRowGroups(n, m, y, [&](int64_t i, int64_t r0, int rows, float* out) {
      thread_local std::vector<uint16_t> unused;
      kern.dot_rows_bf16(xs + i * k, row(r0, rows, unused), k, rows, out);
    });
    return;
  }
  BlockedTiles<uint16_t, uint16_t>(kern, xs, n, m, k, y, kern.tile_bf16, row);
}

void MatMulSimd(const simd::Kernels& kern, const float* x, int64_t n, const WeightView& w,
                float* y) {
  const int64_t m = w.rows, k = w.cols;
  const int t = ElemCode(w.dtype);
  if (UsesBf16Products(kern, w, n)) {
    MatMulBf16(kern, x, n, m, k, y, [&](int64_t r0, int64_t, std::vector<uint16_t>&) {
      return static_cast<const uint16_t*>(w.row(r0));  // stored rows are consecutive
    });
    return;
  }
  if (n <= 2) {
    // Memory-bound: stream each weight row once, straight from its stored dtype.
    MatVecRowGroups(n, m, y, [&](int64_t i, int64_t r0, int rows, float* out) {
      kern.dot_rows(x + i * k, w.row(r0), t, k, rows, out);
    });
    return;
  }
  if (t != simd::kElemF32 && kern.tile_widen16 != nullptr) {
    // Compute-bound, 16-bit rows read as stored and widened in registers by the tiles.
    BlockedTiles<float, uint16_t>(
        kern, x, n, m, k, y,
        [&](const float* xa, int64_t ldx, const uint16_t* wb, int64_t ldw, int64_t len, int na,
            int nb, float* ya,
            int64_t ldy) { kern.tile_widen16(xa, ldx, wb, t, ldw, len, na, nb, ya, ldy); },
        [&](int64_t r0, int64_t, std::vector<uint16_t>&) {
          return static_cast<const uint16_t*>(w.row(r0));
        });
    return;
  }
  // Compute-bound: a block of weight rows in float32 (16-bit ones widened once), reused for
  // every token.
  BlockedTiles<float, float>(
      kern, x, n, m, k, y, kern.tile,
      [&](int64_t r0, int64_t rows, std::vector<float>& scratch) -> const float* {
        if (t == simd::kElemF32) return static_cast<const float*>(w.row(r0));
        scratch.resize(static_cast<size_t>(rows * k));
        for (int64_t r = 0; r < rows; ++r) {
          kern.convert_row(w.row(r0 + r), t, k, scratch.data() + r * k);
        }
        return scratch.data();
      });
}

// Block-quantized weights. Few tokens (decode): activations quantized per block once, then
// integer dot products per (token, weight row), each weight row streamed once per token. Many
// tokens (prefill) with bf16 products: blocks of rows dequantized to bf16 once and reused for
// every token (without bf16 products, prefill is MatMulQuantPanels).
void MatMulQuantSimd(const simd::Kernels& kern, const float* x, int64_t n, const WeightView& w,
                     float* y) {
  const int64_t m = w.rows, k = w.cols, blocks = k / kQuantBlock;
  const int code = w.quant == Quant::kQ8_0 ? simd::kQuantQ8_0 : simd::kQuantQ4_0;
  if (UsesBf16Products(kern, w, n)) {
    // Prefill with bf16 products: each block of rows dequantized to bf16 once.
    MatMulBf16(kern, x, n, m, k, y,
               [&](int64_t r0, int64_t rows, std::vector<uint16_t>& scratch) -> const uint16_t* {
                 thread_local std::vector<float> f;
                 f.resize(static_cast<size_t>(k));
                 scratch.resize(static_cast<size_t>(rows * k));
                 for (int64_t r = 0; r < rows; ++r) {
                   kern.dequantize_row(w.row(r0 + r), code, blocks, f.data());
                   kern.to_bf16(f.data(), k, scratch.data() + r * k);
                 }
                 return scratch.data();
               });
    return;
  }
  thread_local QuantizedRows xq;
  QuantizeActivations(x, n, k, &xq);
  const int8_t* q = xq.q.data();
  const float* scale = xq.scale.data();
  const float* sum = xq.sum.data();
  MatVecRowGroups(n, m, y, [&](int64_t i, int64_t r0, int rows, float* out) {
    kern.dot_rows_quant(q + i * k, scale + i * blocks, sum + i * blocks, w.row(r0), code, blocks,
                        rows, out);
  });
}

}  // namespace

SimdLevel ActiveSimdLevel() {
  static const SimdLevel detected = DetectSimdLevel();
  const int forced = g_forced_level.load(std::memory_order_relaxed);
  if (forced >= 0) return std::min(static_cast<SimdLevel>(forced), detected);
  return detected;
}

void SetSimdLevel(SimdLevel level) { g_forced_level.store(static_cast<int>(level)); }
void ResetSimdLevel() { g_forced_level.store(-1); }

namespace {

// The SIMD loops of the active level; nullptr at kScalar.
const simd::Kernels* ActiveKernels() {
  static const simd::Kernels avx2 = simd::Avx2Kernels();
  static const simd::Kernels avx512 = simd::Avx512Kernels();
  static const simd::Kernels avx512_vnni = simd::Avx512VnniKernels();
  static const simd::Kernels avx512_bf16 = simd::Avx512Bf16Kernels();
  switch (ActiveSimdLevel()) {
    case SimdLevel::kAvx512Bf16:
      return &avx512_bf16;
    case SimdLevel::kAvx2:
      return &avx2;
    case SimdLevel::kAvx512:
      return &avx512;
    case SimdLevel::kAvx512Vnni:
      return &avx512_vnni;
    case SimdLevel::kScalar:
      break;
  }
  return nullptr;
}

}  // namespace

std::string CpuFeatures() {
  __builtin_cpu_init();
  std::string s;
  auto add = [&s](bool has, const char* name) {
    if (!has) return;
    if (!s.empty()) s += ' ';
    s += name;
  };
  add(__builtin_cpu_supports("avx512f"), "avx512f");
  add(__builtin_cpu_supports("avx512bw"), "avx512bw");
  add(__builtin_cpu_supports("avx512vl"), "avx512vl");
  add(__builtin_cpu_supports("avx512bf16"), "avx512bf16");
  add(__builtin_cpu_supports("avx512vnni"), "avx512vnni");
  add(__builtin_cpu_supports("avx2"), "avx2");
  add(__builtin_cpu_supports("fma"), "fma");
  // F16C through CPUID (leaf 1, ECX bit 29): not every compiler's builtin knows it.
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  add(__get_cpuid(1, &eax, &ebx, &ecx, &edx) != 0 && (ecx & (1u << 29)) != 0, "f16c");
  return s.empty() ? "none" : s;
}

void SetNumThreads(int n) { SetPoolThreads(n); }
int NumThreads() { return PoolThreads(); }

void Embedding(const int32_t* ids, int64_t n, const WeightView& table, float* out) {
  KVGATE_CHECK(table.layout == Layout::kRows);
  const int64_t dim = table.cols;
  for (int64_t i = 0; i < n; ++i) {
    KVGATE_CHECK(ids[i] >= 0 && ids[i] < table.rows);
    if (table.quant != Quant::kNone) {  // --quantize-all
      DequantizeRow(static_cast<const uint8_t*>(table.row(ids[i])), dim, table.quant,
                    out + i * dim);
    } else {
      ConvertToF32(table.dtype, table.row(ids[i]), out + i * dim, static_cast<size_t>(dim));
    }
  }
}

void RmsNorm(const float* x, int64_t n, int64_t dim, const WeightView& weight, double eps,
             float* out) {
  thread_local std::vector<float> w;
  w.resize(static_cast<size_t>(dim));
  ConvertToF32(weight.dtype, weight.data, w.data(), static_cast<size_t>(dim));
  for (int64_t i = 0; i < n; ++i) {
    const float* xi = x + i * dim;
    double ss = 0.0;
    for (int64_t j = 0; j < dim; ++j) ss += static_cast<double>(xi[j]) * xi[j];
    const float inv = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(dim) + eps));
    float* oi = out + i * dim;
    for (int64_t j = 0; j < dim; ++j) oi[j] = w[static_cast<size_t>(j)] * (xi[j] * inv);
  }
}

int64_t PanelElements(int64_t m, int64_t k) {
  return (m + kPanelRows - 1) / kPanelRows * kPanelRows * k;
}

namespace {

template <typename T>
void PackPanelsOf(const T* src, int64_t m, int64_t k, T* out) {
  ParallelFor((m + kPanelRows - 1) / kPanelRows, Schedule::kStatic,
              [&](int64_t begin, int64_t end) {
                for (int64_t p = begin; p < end; ++p) {
                  T* panel = out + p * k * kPanelRows;
                  // 64 columns at a time: the 16 rows' pieces land in one 2-4 KiB block.
                  for (int64_t c0 = 0; c0 < k; c0 += 64) {
                    const int64_t c1 = std::min(k, c0 + 64);
                    for (int64_t r = 0; r < kPanelRows; ++r) {
                      const int64_t row = p * kPanelRows + r;
                      const T* s = src + row * k;
                      for (int64_t c = c0; c < c1; ++c) {
                        panel[c * kPanelRows + r] = row < m ? s[c] : T{0};
                      }
                    }
                  }
                }
              });
}

}  // namespace

WeightView PackPanels(const WeightView& w, void* out) {
  KVGATE_CHECK(w.quant == Quant::kNone && w.layout == Layout::kRows);
  if (w.dtype == DType::kF32) {
    PackPanelsOf(static_cast<const float*>(w.data), w.rows, w.cols, static_cast<float*>(out));
  } else {  // bf16, f16: the bits as stored
    PackPanelsOf(static_cast<const uint16_t*>(w.data), w.rows, w.cols, static_cast<uint16_t*>(out));
  }
  WeightView packed = w;
  packed.data = out;
  packed.layout = Layout::kPanels;
  return packed;
}

bool MatMulRoundsActivationsToBf16(const WeightView& w, int64_t n) {
  const simd::Kernels* kern = ActiveKernels();
  return kern != nullptr && UsesBf16Products(*kern, w, n);
}

void SetBf16Products(bool on) { g_bf16_products.store(on); }
bool Bf16Products() { return g_bf16_products.load(std::memory_order_relaxed); }

void MatMul(const float* x, int64_t n, const WeightView& w, const WeightView* bias, float* y) {
  const bool quantized = w.quant != Quant::kNone;
  const simd::Kernels* kern = ActiveKernels();
  if (w.layout == Layout::kPanels) {
    MatMulPanels(kern, x, n, w, y);
  } else if (quantized && n > kQuantIntegerMaxTokens &&
             (kern == nullptr || !UsesBf16Products(*kern, w, n))) {
    MatMulQuantPanels(kern, x, n, w, y);
  } else if (kern == nullptr) {
    if (quantized) {
      MatMulQuantReference(x, n, w, y);
    } else {
      MatMulScalar(x, n, w, y);
    }
  } else if (quantized) {
    MatMulQuantSimd(*kern, x, n, w, y);
  } else {
    MatMulSimd(*kern, x, n, w, y);
  }
  if (bias != nullptr && !bias->empty()) {
    const int64_t m = w.rows;
    const float* b = static_cast<const float*>(bias->data);
    thread_local std::vector<float> widened;
    if (bias->dtype != DType::kF32) {  // widen 16-bit biases; float32 ones are used in place
      widened.resize(static_cast<size_t>(m));
      ConvertToF32(bias->dtype, bias->data, widened.data(), static_cast<size_t>(m));
      b = widened.data();
    }
    for (int64_t i = 0; i < n; ++i)
      for (int64_t r = 0; r < m; ++r) y[i * m + r] += b[r];
  }
}

void Rope(float* x, int64_t n, int64_t num_heads, int64_t head_dim, int64_t rotary_dim,
          const float* cos, const float* sin) {
  const int64_t half = rotary_dim / 2;
  for (int64_t i = 0; i < n; ++i) {
    const float* c = cos + i * half;
    const float* s = sin + i * half;
    for (int64_t h = 0; h < num_heads; ++h) {
      float* v = x + (i * num_heads + h) * head_dim;
      for (int64_t j = 0; j < half; ++j) {
        const float a = v[j], b = v[j + half];
        v[j] = a * c[j] - b * s[j];
        v[j + half] = b * c[j] + a * s[j];
      }
    }
  }
}

void SiluMul(const float* gate, const float* up, size_t count, float* out) {
  const simd::Kernels* kern = ActiveKernels();
  auto range = [&](int64_t begin, int64_t end) {
    if (kern != nullptr && kern->silu_mul != nullptr) {
      kern->silu_mul(gate + begin, up + begin, end - begin, out + begin);
      return;
    }
    for (int64_t i = begin; i < end; ++i) {
      const float g = gate[i];
      out[i] = g / (1.0f + std::exp(-g)) * up[i];
    }
  };
  const auto n = static_cast<int64_t>(count);
  if (n > 65536) {
    ParallelFor(n, Schedule::kStatic, range);
  } else {
    range(0, n);
  }
}

void Add(float* x, const float* y, size_t count) {
  for (size_t i = 0; i < count; ++i) x[i] += y[i];
}

namespace {

// Row j of a K or V view as float32: in place for float32 views, else converted to `tmp`.
const float* ViewRow(const void* base, const KvHeadView& view, int64_t j, int64_t head_dim,
                     std::vector<float>& tmp) {
  if (view.dtype == DType::kF32) return static_cast<const float*>(base) + j * view.stride;
  tmp.resize(static_cast<size_t>(head_dim));
  const auto* row = static_cast<const uint8_t*>(base) +
                    j * view.stride * static_cast<int64_t>(DTypeSize(view.dtype));
  ConvertToF32(view.dtype, row, tmp.data(), static_cast<size_t>(head_dim));
  return tmp.data();
}

// Softmax's scaled scores of query `end - 1` over keys [start, end) in p [end - start]: each
// scaled, or -inf where Attention-Gate hides a new key from it (view.new_visible; `first_new`:
// the step's first new key); returns the largest.
float ScaleAndMask(const simd::Kernels* kern, float* p, const KvHeadView& view, int64_t start,
                   int64_t end, int64_t first_new, float scale) {
  if (view.new_visible == nullptr && kern != nullptr && kern->scale_max != nullptr) {
    return kern->scale_max(p, end - start, scale);
  }
  float max_score = -INFINITY;
  for (int64_t j = start; j < end; ++j) {
    float& s = p[j - start];
    if (view.new_visible != nullptr && j >= first_new && j < end - 1 &&
        view.new_visible[j - first_new] == 0) {
      s = -INFINITY;  // hidden by its gate
      continue;
    }
    s *= scale;
    max_score = std::max(max_score, s);
  }
  return max_score;
}

// One query head of one new token over its KV head: writes the output row and leaves the
// softmax probabilities of keys [start, end) in `probs`.
// `first_new`: index of the step's first new key (for view.new_visible); the query is key
// end - 1 itself. `kern`: the SIMD inner loops; nullptr runs the plain reference loops.
void AttendOne(const simd::Kernels* kern, const float* qi, const KvHeadView& view, int64_t start,
               int64_t end, int64_t first_new, int64_t head_dim, float scale,
               std::vector<float>& probs, std::vector<float>& acc, float* out) {
  thread_local std::vector<float> row_tmp;
  const int64_t count = end - start;
  const int code = ElemCode(view.dtype);
  const int64_t row_bytes = view.stride * static_cast<int64_t>(DTypeSize(view.dtype));
  probs.resize(static_cast<size_t>(count));
  if (kern != nullptr) {
    kern->score_rows(qi, static_cast<const uint8_t*>(view.k) + start * row_bytes, code, head_dim,
                     view.stride, count, probs.data());
  } else {
    for (int64_t j = start; j < end; ++j) {
      const float* kj = ViewRow(view.k, view, j, head_dim, row_tmp);
      float s = 0.f;
      for (int64_t e = 0; e < head_dim; ++e) s += qi[e] * kj[e];
      probs[static_cast<size_t>(j - start)] = s;
    }
  }
  const float max_score = ScaleAndMask(kern, probs.data(), view, start, end, first_new, scale);
  float sum = 0.f;
  if (kern != nullptr) {
    sum = kern->exp_sum(probs.data(), count, max_score);
  } else {
    for (auto& p : probs) {
      p = std::exp(p - max_score);
      sum += p;
    }
  }
  const float inv = 1.0f / sum;
  for (auto& p : probs) p *= inv;
  acc.assign(static_cast<size_t>(head_dim), 0.f);
  if (kern != nullptr) {
    kern->accumulate_rows(probs.data(), static_cast<const uint8_t*>(view.v) + start * row_bytes,
                          code, head_dim, view.stride, count, acc.data());
  } else {
    for (int64_t j = start; j < end; ++j) {
      const float p = probs[static_cast<size_t>(j - start)];
      const float* vj = ViewRow(view.v, view, j, head_dim, row_tmp);
      for (int64_t e = 0; e < head_dim; ++e) acc[static_cast<size_t>(e)] += p * vj[e];
    }
  }
  std::copy(acc.begin(), acc.end(), out);
}

// Queries i0 .. i0 + na - 1 (consecutive new tokens, q and out rows `ld` apart) of one head
// over its KV head, each exactly as AttendOne computes it, bit for bit: the keys' dot products
// by the matrix tiles (each pair as score_rows sums it), the softmax per query over its own range
// [start[i], stop[i]), and the V rows loaded once for all queries (probabilities outside a
// query's range are zero, which adds nothing). Float32 KV and SIMD kernels only.
void AttendBlock(const simd::Kernels& kern, const float* q, int64_t ld, int na,
                 const KvHeadView& view, const int64_t* start, const int64_t* stop,
                 int64_t first_new, int64_t head_dim, float scale, float* out) {
  thread_local std::vector<float> scores;
  const int64_t lo = *std::min_element(start, start + na);
  const int64_t hi = *std::max_element(stop, stop + na);
  const int64_t count = hi - lo;
  scores.resize(static_cast<size_t>(na * count));
  const auto* k = static_cast<const float*>(view.k);
  for (int64_t j0 = lo; j0 < hi; j0 += 4) {
    const int nb = static_cast<int>(std::min<int64_t>(4, hi - j0));
    kern.tile(q, ld, k + j0 * view.stride, view.stride, head_dim, na, nb, scores.data() + (j0 - lo),
              count);
  }
  for (int i = 0; i < na; ++i) {
    float* p = scores.data() + i * count;
    const float max_score =
        ScaleAndMask(&kern, p + (start[i] - lo), view, start[i], stop[i], first_new, scale);
    const float sum = kern.exp_sum(p + (start[i] - lo), stop[i] - start[i], max_score);
    const float inv = 1.0f / sum;
    for (int64_t j = start[i]; j < stop[i]; ++j) p[j - lo] *= inv;
    std::fill(p, p + (start[i] - lo), 0.f);
    std::fill(p + (stop[i] - lo), p + count, 0.f);
  }
  // The weighted sums of V rows straight into the output rows, from zero.
  for (int i = 0; i < na; ++i) std::fill(out + i * ld, out + i * ld + head_dim, 0.f);
  const auto* v = static_cast<const float*>(view.v) + lo * view.stride;
  if (kern.accumulate_tile != nullptr) {
    kern.accumulate_tile(scores.data(), count, na, v, simd::kElemF32, head_dim, view.stride, count,
                         out, ld);
  } else {
    for (int i = 0; i < na; ++i) {
      kern.accumulate_rows(scores.data() + i * count, v, simd::kElemF32, head_dim, view.stride,
                           count, out + i * ld);
    }
  }
}

}  // namespace

void Attention(const float* q, int64_t n, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
               const KvHeadView* kv, int64_t window, float* out, const AttentionMass* mass) {
  const int64_t group = num_heads / num_kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  auto range = [&](const KvHeadView& view, int64_t i) {
    const int64_t end = view.len - n + i + 1;
    return std::pair<int64_t, int64_t>(window > 0 ? std::max<int64_t>(0, end - window) : 0, end);
  };
  const simd::Kernels* kern = ActiveKernels();
  const bool blocks = kern != nullptr && n > 1 &&
                      std::all_of(kv, kv + num_kv_heads,
                                  [](const KvHeadView& v) { return v.dtype == DType::kF32; });
  if (mass == nullptr && blocks) {
    // Prefill: blocks of consecutive queries of one head share their keys' and values' loads.
    const int64_t step = kern->tile_tokens;
    const int64_t per_head = (n + step - 1) / step;
    const int64_t ld = num_heads * head_dim;
    ParallelFor(per_head * num_heads, Schedule::kDynamic, [&](int64_t begin, int64_t end) {
      for (int64_t job = begin; job < end; ++job) {
        const int64_t h = job % num_heads, i0 = job / num_heads * step;
        const int na = static_cast<int>(std::min(step, n - i0));
        const KvHeadView& view = kv[h / group];
        int64_t start[8], stop[8];
        for (int i = 0; i < na; ++i) std::tie(start[i], stop[i]) = range(view, i0 + i);
        const int64_t row = (i0 * num_heads + h) * head_dim;
        AttendBlock(*kern, q + row, ld, na, view, start, stop, view.len - n, head_dim, scale,
                    out + row);
      }
    });
    return;
  }
  if (mass == nullptr) {
    ParallelFor(n * num_heads, Schedule::kDynamic, [&](int64_t begin, int64_t end) {
      thread_local std::vector<float> probs, acc;
      for (int64_t job = begin; job < end; ++job) {
        const int64_t i = job / num_heads, h = job % num_heads;
        const KvHeadView& view = kv[h / group];
        const auto [start, stop] = range(view, i);
        const int64_t row = (i * num_heads + h) * head_dim;
        AttendOne(kern, q + row, view, start, stop, view.len - n, head_dim, scale, probs, acc,
                  out + row);
      }
    });
    return;
  }
  // With the mass side output: one job per KV head, so its row is summed by one thread.
  ParallelFor(num_kv_heads, Schedule::kDynamic, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> probs, acc;
    for (int64_t g = begin; g < end; ++g) {
      const KvHeadView& view = kv[g];
      float* m = mass->mass + g * mass->stride;
      std::fill(m, m + view.len, 0.f);
      for (int64_t i = 0; i < n; ++i) {
        const auto [start, stop] = range(view, i);
        for (int64_t h = g * group; h < (g + 1) * group; ++h) {
          const int64_t row = (i * num_heads + h) * head_dim;
          AttendOne(kern, q + row, view, start, stop, view.len - n, head_dim, scale, probs, acc,
                    out + row);
          if (i < mass->first_query) continue;
          for (int64_t j = start; j < stop; ++j) m[j] += probs[static_cast<size_t>(j - start)];
        }
      }
    }
  });
}

void GatherRows(const float* src, int64_t width, const int64_t* rows, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) std::copy_n(src + rows[i] * width, width, dst + i * width);
}

namespace {

// Converts a float32 row to `dtype` storage.
void StoreRow(const float* src, int64_t d, DType dtype, void* dst) {
  switch (dtype) {
    case DType::kF32:
      std::memcpy(dst, src, static_cast<size_t>(d) * 4);
      return;
    case DType::kBF16: {
      auto* o = static_cast<uint16_t*>(dst);
      for (int64_t e = 0; e < d; ++e) o[e] = F32ToBf16(src[e]);
      return;
    }
    case DType::kF16: {
      auto* o = static_cast<uint16_t*>(dst);
      for (int64_t e = 0; e < d; ++e) o[e] = F32ToF16(src[e]);
      return;
    }
  }
}

}  // namespace

void SelectTopK(const float* priorities, int64_t rows, int64_t stride, const int32_t* lens,
                int64_t budget, int32_t* kept, int32_t* kept_count) {
  std::vector<int32_t> idx;
  for (int64_t g = 0; g < rows; ++g) {
    const float* p = priorities + g * stride;
    const int64_t len = lens[g];
    idx.resize(static_cast<size_t>(len));
    std::iota(idx.begin(), idx.end(), 0);
    if (len > budget) {
      std::nth_element(idx.begin(), idx.begin() + budget - 1, idx.end(), [p](int32_t a, int32_t c) {
        return p[a] > p[c] || (p[a] == p[c] && a > c);
      });
      idx.resize(static_cast<size_t>(budget));
      std::sort(idx.begin(), idx.end());
    }
    std::copy(idx.begin(), idx.end(), kept + g * budget);
    kept_count[g] = static_cast<int32_t>(idx.size());
  }
}

void AppendKv(const float* k, const float* v, int64_t n, int64_t num_kv_heads, int64_t head_dim,
              const KvHeadSlot* slots) {
  for (int64_t g = 0; g < num_kv_heads; ++g) {
    const KvHeadSlot& s = slots[g];
    const size_t row_bytes = static_cast<size_t>(head_dim) * DTypeSize(s.dtype);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t src = (i * num_kv_heads + g) * head_dim;
      StoreRow(k + src, head_dim, s.dtype, static_cast<uint8_t*>(s.k) + i * row_bytes);
      StoreRow(v + src, head_dim, s.dtype, static_cast<uint8_t*>(s.v) + i * row_bytes);
    }
  }
}

void CompactKv(void* k, void* v, DType dtype, int64_t head_dim, const int64_t* keep, int64_t count,
               int64_t rotary_dim, const float* cos, const float* sin) {
  const size_t row_bytes = static_cast<size_t>(head_dim) * DTypeSize(dtype);
  auto* kb = static_cast<uint8_t*>(k);
  auto* vb = static_cast<uint8_t*>(v);
  const int64_t half = rotary_dim / 2;
  std::vector<float> row;
  for (int64_t dst = 0; dst < count; ++dst) {
    const int64_t src = keep[dst];
    if (src == dst) continue;
    std::memmove(kb + dst * row_bytes, kb + src * row_bytes, row_bytes);
    std::memmove(vb + dst * row_bytes, vb + src * row_bytes, row_bytes);
    if (cos == nullptr) continue;
    // Re-rotation of the moved key (the arithmetic of Rope, on the row widened to float32).
    row.resize(static_cast<size_t>(head_dim));
    ConvertToF32(dtype, kb + dst * row_bytes, row.data(), static_cast<size_t>(head_dim));
    const float* c = cos + dst * half;
    const float* s = sin + dst * half;
    for (int64_t j = 0; j < half; ++j) {
      const float a = row[static_cast<size_t>(j)], b = row[static_cast<size_t>(j + half)];
      row[static_cast<size_t>(j)] = a * c[j] - b * s[j];
      row[static_cast<size_t>(j + half)] = b * c[j] + a * s[j];
    }
    StoreRow(row.data(), head_dim, dtype, kb + dst * row_bytes);
  }
}

void ExpectedAttention(const void* k, const void* v, DType dtype, int64_t len, int64_t head_dim,
                       int64_t skip, const float* mu, const float* cov, int64_t group, float* out) {
  const size_t d = static_cast<size_t>(head_dim);
  const size_t row_bytes = d * DTypeSize(dtype);
  const float scale = 1.f / std::sqrt(static_cast<float>(head_dim));
  std::vector<float> kr(d), vr(d), s(static_cast<size_t>(std::max<int64_t>(len, 0) * group));
  std::fill(out, out + len, 0.f);
  for (int64_t j = skip; j < len; ++j) {
    ConvertToF32(dtype, static_cast<const uint8_t*>(k) + static_cast<size_t>(j) * row_bytes,
                 kr.data(), d);
    for (int64_t g = 0; g < group; ++g) {
      const float* m = mu + static_cast<size_t>(g) * d;
      float lin = 0.f;
      for (size_t e = 0; e < d; ++e) lin += m[e] * kr[e];
      float quad = 0.f;
      if (cov != nullptr) {
        const float* c = cov + static_cast<size_t>(g) * d * d;
        for (size_t a = 0; a < d; ++a) {
          float row = 0.f;
          for (size_t b = 0; b < d; ++b) row += c[a * d + b] * kr[b];
          quad += kr[a] * row;
        }
      }
      s[static_cast<size_t>(g * len + j)] =
          lin * scale + quad / (2.f * static_cast<float>(head_dim));
    }
  }
  if (len <= skip) return;
  for (int64_t g = 0; g < group; ++g) {
    float* sg = s.data() + static_cast<size_t>(g * len);
    const float mx = *std::max_element(sg + skip, sg + len);
    float sum = 0.f;
    for (int64_t j = skip; j < len; ++j) {
      sg[j] = std::exp(sg[j] - mx);
      sum += sg[j];
    }
    for (int64_t j = skip; j < len; ++j) out[j] += sg[j] / sum / static_cast<float>(group);
  }
  for (int64_t j = skip; j < len; ++j) {
    ConvertToF32(dtype, static_cast<const uint8_t*>(v) + static_cast<size_t>(j) * row_bytes,
                 vr.data(), d);
    float norm = 0.f;
    for (size_t e = 0; e < d; ++e) norm += vr[e] * vr[e];
    out[j] *= std::sqrt(norm);
  }
}

void LocretScore(const LocretLayerWeights& w, const float* q, const float* k, const float* v,
                 int64_t n, int64_t num_kv_heads, float* out) {
  const int64_t d_r = w.fc1.rows, din = w.fc1.cols;
  const int64_t kv_dim = w.kv_dim, qd = din - 2 * kv_dim;  // d_in = q_dim + 2 kv_dim
  // Blocks of tokens through the (SIMD, threaded) MatMul: x = concat(q, k, v), hidden =
  // silu(x fc1^T), out = hidden fc2^T.
  constexpr int64_t kBlock = 256;
  std::vector<float> x(static_cast<size_t>(std::min(n, kBlock) * din));
  std::vector<float> hidden(static_cast<size_t>(std::min(n, kBlock) * d_r));
  for (int64_t t0 = 0; t0 < n; t0 += kBlock) {
    const int64_t m = std::min(kBlock, n - t0);
    for (int64_t t = 0; t < m; ++t) {
      float* xp = x.data() + t * din;
      std::copy_n(q + (t0 + t) * qd, qd, xp);
      std::copy_n(k + (t0 + t) * kv_dim, kv_dim, xp + qd);
      std::copy_n(v + (t0 + t) * kv_dim, kv_dim, xp + qd + kv_dim);
    }
    MatMul(x.data(), m, w.fc1, nullptr, hidden.data());
    for (int64_t i = 0; i < m * d_r; ++i) {
      const float a = hidden[static_cast<size_t>(i)];
      hidden[static_cast<size_t>(i)] = a / (1.f + std::exp(-a));  // SiLU
    }
    MatMul(hidden.data(), m, w.fc2, nullptr, out + t0 * num_kv_heads);
  }
}

void GateProbabilities(const GateLayerWeights& w, const float* x, int64_t n, int64_t hidden_size,
                       int64_t num_kv_heads, float* gate_k, float* gate_v, int64_t past, float* p) {
  const int64_t heads = w.heads, head_dim = w.head_dim;
  const int64_t width = heads * head_dim;
  std::vector<float> q(static_cast<size_t>(n * width)), o(static_cast<size_t>(n * width));
  MatMul(x, n, w.wq, nullptr, q.data());
  MatMul(x, n, w.wk, nullptr, gate_k + past * width);
  MatMul(x, n, w.wv, nullptr, gate_v + past * width);
  // The gate's causal attention: the model's attention op, each gate head a KV head whose rows
  // are `width` apart in gate_k / gate_v.
  std::vector<KvHeadView> views(static_cast<size_t>(heads));
  for (int64_t h = 0; h < heads; ++h) {
    views[static_cast<size_t>(h)] = KvHeadView{
        gate_k + h * head_dim, gate_v + h * head_dim, past + n, width, nullptr, DType::kF32};
  }
  Attention(q.data(), n, heads, heads, head_dim, views.data(), 0, o.data(), nullptr);
  MatMul(o.data(), n, w.wo, nullptr, p);
  const auto* bo = static_cast<const float*>(w.bo.data);
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t j = 0; j < num_kv_heads; ++j) {
      const float logit = p[t * num_kv_heads + j] + bo[j];
      p[t * num_kv_heads + j] = 1.0f / (1.0f + std::exp(-logit));
    }
  }
}

}  // namespace kvgate::kernels::cpu
