// AVX2 + FMA + F16C inner loops. Compiled with -mavx2 -mfma -mf16c.
#include <immintrin.h>

#include "kernels/cpu/simd.h"

namespace kvgate::kernels::cpu::simd {
namespace {

inline __m256 Load8(const void* p, int t, int64_t i) {
  if (t == kElemF32) return _mm256_loadu_ps(static_cast<const float*>(p) + i);
  const __m128i h =
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
  if (t == kElemBF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  return _mm256_cvtph_ps(h);
}

inline float LoadScalar(const void* p, int t, int64_t i) {
  if (t == kElemF32) return static_cast<const float*>(p)[i];
  const uint16_t h = static_cast<const uint16_t*>(p)[i];
  if (t == kElemBF16) {
    const __m128i v = _mm_cvtsi32_si128(static_cast<int>(h) << 16);
    return _mm_cvtss_f32(_mm_castsi128_ps(v));
  }
  return _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h)));
}

inline float HSum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  const __m128 hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  __m128 sh = _mm_movehdup_ps(lo);
  lo = _mm_add_ps(lo, sh);
  sh = _mm_movehl_ps(sh, lo);
  return _mm_cvtss_f32(_mm_add_ss(lo, sh));
}

// Row `r` of `w`, rows `stride` elements of type `t` apart.
inline const void* RowPtr(const void* w, int t, int64_t stride, int64_t r) {
  const int64_t bytes = t == kElemF32 ? 4 : 2;
  return static_cast<const uint8_t*>(w) + r * stride * bytes;
}

// out[r] = dot(x, row r) for R rows of `k` elements, `stride` elements apart.
template <int R>
void DotRowsT(const float* x, const void* w, int t, int64_t k, float* out, int64_t stride) {
  __m256 acc[R];
  const void* rows[R];
  for (int r = 0; r < R; ++r) {
    acc[r] = _mm256_setzero_ps();
    rows[r] = RowPtr(w, t, stride, r);
  }
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) {
    const __m256 xv = _mm256_loadu_ps(x + i);
    for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(xv, Load8(rows[r], t, i), acc[r]);
  }
  for (int r = 0; r < R; ++r) {
    float s = HSum(acc[r]);
    for (int64_t j = i; j < k; ++j) s += x[j] * LoadScalar(rows[r], t, j);
    out[r] = s;
  }
}

void DotRowsStrided(const float* x, const void* w, int t, int64_t k, int64_t stride, int rows,
                    float* out) {
  switch (rows) {
    case 4:
      return DotRowsT<4>(x, w, t, k, out, stride);
    case 3:
      return DotRowsT<3>(x, w, t, k, out, stride);
    case 2:
      return DotRowsT<2>(x, w, t, k, out, stride);
    default:
      return DotRowsT<1>(x, w, t, k, out, stride);
  }
}

void DotRows(const float* x, const void* w, int t, int64_t k, int rows, float* out) {
  DotRowsStrided(x, w, t, k, k, rows, out);
}

void ScoreRows(const float* q, const void* k, int t, int64_t d, int64_t stride, int64_t count,
               float* out) {
  for (int64_t j = 0; j < count; j += 4) {
    DotRowsStrided(q, RowPtr(k, t, stride, j), t, d, stride,
                   static_cast<int>(count - j < 4 ? count - j : 4), out + j);
  }
}

void AccumulateRows(const float* p, const void* v, int t, int64_t d, int64_t stride, int64_t count,
                    float* acc) {
  // Up to 32 output elements (4 registers) per pass over the rows; a tail under 8 elements
  // in scalar code.
  const int64_t full = d / 8 * 8;
  for (int64_t e0 = 0; e0 < full; e0 += 32) {
    const int regs = static_cast<int>((full - e0 < 32 ? full - e0 : 32) / 8);
    __m256 a[4];
    for (int r = 0; r < regs; ++r) a[r] = _mm256_loadu_ps(acc + e0 + 8 * r);
    for (int64_t j = 0; j < count; ++j) {
      const void* row = RowPtr(v, t, stride, j);
      const __m256 pj = _mm256_set1_ps(p[j]);
      for (int r = 0; r < regs; ++r) a[r] = _mm256_fmadd_ps(pj, Load8(row, t, e0 + 8 * r), a[r]);
    }
    for (int r = 0; r < regs; ++r) _mm256_storeu_ps(acc + e0 + 8 * r, a[r]);
  }
  for (int64_t j = 0; j < count && full < d; ++j) {
    const void* row = RowPtr(v, t, stride, j);
    for (int64_t e = full; e < d; ++e) acc[e] += p[j] * LoadScalar(row, t, e);
  }
}

void ConvertRow(const void* src, int t, int64_t k, float* dst) {
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) _mm256_storeu_ps(dst + i, Load8(src, t, i));
  for (; i < k; ++i) dst[i] = LoadScalar(src, t, i);
}

void Tile4x4(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t k, int na, int nb,
             float* y, int64_t ldy) {
  if (na != 4 || nb != 4) {
    for (int a = 0; a < na; ++a) {
      for (int b = 0; b < nb; ++b) {
        float out;
        DotRowsT<1>(x + a * ldx, w + b * ldw, kElemF32, k, &out, k);
        y[a * ldy + b] = out;
      }
    }
    return;
  }
  // 4x4 accumulators would need 16 of the 16 ymm registers; use 4x2 halves.
  for (int half = 0; half < 2; ++half) {
    const float* wh = w + 2 * half * ldw;
    __m256 acc[4][2];
    for (int a = 0; a < 4; ++a) acc[a][0] = acc[a][1] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= k; i += 8) {
      const __m256 w0 = _mm256_loadu_ps(wh + i);
      const __m256 w1 = _mm256_loadu_ps(wh + ldw + i);
      for (int a = 0; a < 4; ++a) {
        const __m256 xv = _mm256_loadu_ps(x + a * ldx + i);
        acc[a][0] = _mm256_fmadd_ps(xv, w0, acc[a][0]);
        acc[a][1] = _mm256_fmadd_ps(xv, w1, acc[a][1]);
      }
    }
    for (int a = 0; a < 4; ++a) {
      for (int b = 0; b < 2; ++b) {
        float s = HSum(acc[a][b]);
        for (int64_t j = i; j < k; ++j) s += x[a * ldx + j] * wh[b * ldw + j];
        y[a * ldy + 2 * half + b] = s;
      }
    }
  }
}

// exp(x) for x <= 0, as simd_avx512.cc's ExpNonPositive, 8 lanes.
inline __m256 ExpNonPositive(__m256 x) {
  const __m256 tiny = _mm256_cmp_ps(x, _mm256_set1_ps(-87.f), _CMP_LT_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.f / 720.f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
  const __m256 y = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
  return _mm256_andnot_ps(tiny, y);
}

// silu(g) * up, as simd_avx512.cc's SiluMul, 8 lanes (the last masked).
void SiluMul(const float* gate, const float* up, int64_t count, float* out) {
  const __m256 one = _mm256_set1_ps(1.f), zero = _mm256_setzero_ps();
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t i = 0; i < count; i += 8) {
    const int rem = static_cast<int>(count - i < 8 ? count - i : 8);
    const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(rem), lane);
    const __m256 g = _mm256_maskload_ps(gate + i, m);
    const __m256 e = ExpNonPositive(_mm256_or_ps(g, sign));  // exp(-|g|)
    const __m256 num = _mm256_blendv_ps(one, e, _mm256_cmp_ps(g, zero, _CMP_LT_OQ));
    const __m256 sig = _mm256_div_ps(num, _mm256_add_ps(one, e));
    _mm256_maskstore_ps(out + i, m,
                        _mm256_mul_ps(_mm256_mul_ps(g, sig), _mm256_maskload_ps(up + i, m)));
  }
}

float ExpSum(float* p, int64_t count, float max) {
  const __m256 m = _mm256_set1_ps(max);
  __m256 sum = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= count; j += 8) {
    const __m256 e = ExpNonPositive(_mm256_sub_ps(_mm256_loadu_ps(p + j), m));
    _mm256_storeu_ps(p + j, e);
    sum = _mm256_add_ps(sum, e);
  }
  if (j < count) {  // the tail through a zero-padded copy
    alignas(32) float tail[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t t = j; t < count; ++t) tail[t - j] = p[t] - max;
    const __m256 e = ExpNonPositive(_mm256_load_ps(tail));
    _mm256_store_ps(tail, e);
    for (int64_t t = j; t < count; ++t) {
      p[t] = tail[t - j];
      sum = _mm256_add_ps(sum, _mm256_setr_ps(tail[t - j], 0, 0, 0, 0, 0, 0, 0));
    }
  }
  return HSum(sum);
}

float ScaleMax(float* p, int64_t count, float scale) {
  const __m256 sc = _mm256_set1_ps(scale);
  __m256 mx = _mm256_set1_ps(-__builtin_inff());
  int64_t j = 0;
  for (; j + 8 <= count; j += 8) {
    const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(p + j), sc);
    _mm256_storeu_ps(p + j, v);
    mx = _mm256_max_ps(v, mx);  // (v > mx) ? v : mx, as std::max(mx, v)
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, mx);
  float out = lanes[0];
  for (int i = 1; i < 8; ++i) out = out < lanes[i] ? lanes[i] : out;
  for (; j < count; ++j) {
    p[j] *= scale;
    out = out < p[j] ? p[j] : out;
  }
  return out;
}

// r[i] lane j -> r[j] lane i.
inline void Transpose8(__m256 (&r)[8]) {
  __m256 t[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  __m256 u[8];
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xee);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xee);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

void RowsToPanel(const float* rows, int64_t ld, int nrows, int64_t k, float* panel) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t c0 = 0; c0 < k; c0 += 8) {
    const int64_t cols = k - c0 < 8 ? k - c0 : 8;
    const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(cols)), lane);
    for (int h = 0; h < 2; ++h) {  // rows 0-7, then 8-15
      __m256 r[8];
      for (int i = 0; i < 8; ++i) {
        r[i] = 8 * h + i < nrows ? _mm256_maskload_ps(rows + (8 * h + i) * ld + c0, m)
                                 : _mm256_setzero_ps();
      }
      Transpose8(r);
      for (int64_t j = 0; j < cols; ++j) _mm256_storeu_ps(panel + (c0 + j) * 16 + 8 * h, r[j]);
    }
  }
}

// Panel columns as float32, 8 lanes: stored float32, or 16-bit ones (type kType) widened.
struct PanelF32 {
  using T = float;
  static __m256 Load(const float* p) { return _mm256_loadu_ps(p); }
};
template <int kType>
struct Panel16 {
  using T = uint16_t;
  static __m256 Load(const uint16_t* p) { return Load8(p, kType, 0); }
};

// An MR x NP panel tile (simd.h, PanelTileFn): each panel's 16 outputs in two 8-lane
// accumulators per token, summed in index order, the token's element broadcast.
template <typename L, int MR, int NP>
void PanelTileT(const float* x, int64_t ldx, const typename L::T* w, int64_t k, float* y,
                int64_t ldy, int64_t cols) {
  __m256 c[MR][2 * NP];
  for (int a = 0; a < MR; ++a)
    for (int b = 0; b < 2 * NP; ++b) c[a][b] = _mm256_setzero_ps();
  const int64_t panel = k * 16;
  for (int64_t i = 0; i < k; ++i) {
    if constexpr (NP == 1) {  // both halves held, each token broadcast in turn (15 registers)
      const __m256 w0 = L::Load(w + i * 16), w1 = L::Load(w + i * 16 + 8);
      for (int a = 0; a < MR; ++a) {
        const __m256 xb = _mm256_broadcast_ss(x + a * ldx + i);
        c[a][0] = _mm256_fmadd_ps(xb, w0, c[a][0]);
        c[a][1] = _mm256_fmadd_ps(xb, w1, c[a][1]);
      }
    } else {  // 1 or 2 tokens held broadcast, each half loaded in turn
      __m256 xb[MR];
      for (int a = 0; a < MR; ++a) xb[a] = _mm256_broadcast_ss(x + a * ldx + i);
      for (int b = 0; b < 2 * NP; ++b) {
        const __m256 wv = L::Load(w + (b / 2) * panel + i * 16 + (b % 2) * 8);
        for (int a = 0; a < MR; ++a) c[a][b] = _mm256_fmadd_ps(xb[a], wv, c[a][b]);
      }
    }
  }
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int b = 0; b < 2 * NP; ++b) {
    const int64_t left = cols - b * 8;
    if (left <= 0) break;
    const __m256i m =
        _mm256_cmpgt_epi32(_mm256_set1_epi32(left >= 8 ? 8 : static_cast<int>(left)), lane);
    for (int a = 0; a < MR; ++a) _mm256_maskstore_ps(y + a * ldy + b * 8, m, c[a][b]);
  }
}

// Up to 12 accumulators: 3..6 tokens one panel a pass, 2 tokens three, one token four.
template <typename L, int MR>
void PanelTileTokens(const float* x, int64_t ldx, const typename L::T* w, int np, int64_t k,
                     float* y, int64_t ldy, int64_t cols) {
  constexpr int kChunk = MR == 1 ? 4 : MR == 2 ? 3 : 1;
  for (int p0 = 0; p0 < np; p0 += kChunk) {
    const typename L::T* wp = w + p0 * k * 16;
    float* yp = y + p0 * 16;
    const int64_t left = cols - p0 * 16;
    switch (np - p0 < kChunk ? np - p0 : kChunk) {
      case 1:
        PanelTileT<L, MR, 1>(x, ldx, wp, k, yp, ldy, left);
        break;
      case 2:
        if constexpr (kChunk >= 2) PanelTileT<L, MR, 2>(x, ldx, wp, k, yp, ldy, left);
        break;
      case 3:
        if constexpr (kChunk >= 3) PanelTileT<L, MR, 3>(x, ldx, wp, k, yp, ldy, left);
        break;
      default:
        if constexpr (kChunk >= 4) PanelTileT<L, MR, 4>(x, ldx, wp, k, yp, ldy, left);
        break;
    }
  }
}

#include "kernels/cpu/simd_panel_inl.h"  // NOLINT(build/include): this unit's own copy
#include "kernels/cpu/simd_quant_inl.h"  // NOLINT(build/include): this unit's own copy

template <int R>
void DotRowsQuantT(const int8_t* xq, const float* xs, const float*, const uint8_t* w, int quant,
                   int64_t blocks, float* out) {
  for (int r = 0; r < R; ++r) out[r] = 0.f;
  DotRowsQuantBlocks<R>(xq, xs, w, quant, blocks, 0, out);
}

}  // namespace

Kernels Avx2Kernels() {
  Kernels k{&DotRows,   &ConvertRow,     &Tile4x4, &DotRowsQuant,
            &ScoreRows, &AccumulateRows, &ExpSum,  &DequantizeRowSimd};
  k.silu_mul = &SiluMul;
  k.panel_tile = &PanelTile;
  k.panel_tile16 = &PanelTile16;
  k.scale_max = &ScaleMax;
  k.rows_to_panel = &RowsToPanel;
  return k;
}

}  // namespace kvgate::kernels::cpu::simd
