// AVX-512 (F + BW + VL) inner loops. Compiled with -mavx512f -mavx512bw -mavx512vl -mfma -mf16c,
// once more with -mavx512vnni -DKVGATE_SIMD_VNNI for Avx512VnniKernels, and once more with
// -mavx512bf16 -DKVGATE_SIMD_BF16 as well for Avx512Bf16Kernels.
// GCC 12's AVX-512 intrinsics start from a self-initialized `__Y` (_mm512_undefined_*), which
// -W(maybe-)uninitialized reports wherever they inline (e.g. _mm512_reduce_add_ps); the value is
// never read.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include "kernels/cpu/simd.h"

namespace kvgate::kernels::cpu::simd {
namespace {

inline __m512 Load16(const void* p, int t, int64_t i) {
  if (t == kElemF32) return _mm512_loadu_ps(static_cast<const float*>(p) + i);
  const __m256i h =
      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + i));
  if (t == kElemBF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  return _mm512_cvtph_ps(h);
}

// Masked load of the last `rem` (< 16) elements.
inline __m512 LoadTail(const void* p, int t, int64_t i, int rem) {
  const __mmask16 m = static_cast<__mmask16>((1u << rem) - 1u);
  if (t == kElemF32) return _mm512_maskz_loadu_ps(m, static_cast<const float*>(p) + i);
  const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(p) + i);
  if (t == kElemBF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  return _mm512_cvtph_ps(h);
}

// The sum of a's 16 lanes by a fixed tree (256-bit halves, 128-bit halves, lanes {0,1} + {2,3},
// then the two; GCC's _mm512_reduce_add_ps), written out so that the tiles and dot_rows sum a
// pair the same way whatever the compiler inlines.
inline float ReduceAdd(__m512 a) {
  const __m256 t3 = _mm256_add_ps(_mm512_castps512_ps256(a),
                                  _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
  const __m128 t6 = _mm_add_ps(_mm256_castps256_ps128(t3), _mm256_extractf128_ps(t3, 1));
  const __m128 t8 = _mm_add_ps(t6, _mm_shuffle_ps(t6, t6, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtss_f32(_mm_add_ss(t8, _mm_shuffle_ps(t8, t8, _MM_SHUFFLE(1, 1, 1, 1))));
}

// ReduceAdd of four vectors at once, lane for lane the same additions: out[b] = ReduceAdd(a[b]).
inline void ReduceAdd4(const __m512 (&a)[4], float* out) {
  // Each vector's 256-bit halves added: [a0 (8) | a1 (8)], [a2 | a3].
  const __m512 h01 =
      _mm512_add_ps(_mm512_shuffle_f32x4(a[0], a[1], 0x44), _mm512_shuffle_f32x4(a[0], a[1], 0xee));
  const __m512 h23 =
      _mm512_add_ps(_mm512_shuffle_f32x4(a[2], a[3], 0x44), _mm512_shuffle_f32x4(a[2], a[3], 0xee));
  // Then the 128-bit halves: four lanes per vector, a0 .. a3.
  const __m512 f =
      _mm512_add_ps(_mm512_shuffle_f32x4(h01, h23, 0x88), _mm512_shuffle_f32x4(h01, h23, 0xdd));
  // Lanes {0, 1} + {2, 3}, then the two.
  const __m512 g = _mm512_add_ps(f, _mm512_permute_ps(f, _MM_SHUFFLE(1, 0, 3, 2)));
  const __m512 r = _mm512_add_ps(g, _mm512_permute_ps(g, _MM_SHUFFLE(2, 3, 0, 1)));
  _mm_storeu_ps(out, _mm512_castps512_ps128(_mm512_maskz_compress_ps(0x1111, r)));
}

// Row `r` of `w`, rows `stride` elements of type `t` apart.
inline const void* RowPtr(const void* w, int t, int64_t stride, int64_t r) {
  const int64_t bytes = t == kElemF32 ? 4 : 2;
  return static_cast<const uint8_t*>(w) + r * stride * bytes;
}

// The products' element types for the tiles: float32 with FMA, 16 a step.
struct F32Madd {
  using TX = float;
  using TW = float;
  using V = __m512;
  static constexpr int kStep = 16;
  static V LoadX(const float* p) { return _mm512_loadu_ps(p); }
  static V LoadXTail(const float* p, int64_t rem) {
    return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << rem) - 1u), p);
  }
  static V LoadW(const float* p) { return LoadX(p); }
  static V LoadWTail(const float* p, int64_t rem) { return LoadXTail(p, rem); }
  static __m512 Madd(__m512 acc, V x, V w) { return _mm512_fmadd_ps(x, w, acc); }
};

// Float32 activations times 16-bit weight rows (bf16 or f16, `kWidenType`) widened in registers:
// the same products as F32Madd over the widened values, from half the bytes.
template <int kWidenType>
struct Widen16Madd : F32Madd {
  using TW = uint16_t;
  static V LoadW(const uint16_t* p) { return Load16(p, kWidenType, 0); }
  static V LoadWTail(const uint16_t* p, int64_t rem) {
    return LoadTail(p, kWidenType, 0, static_cast<int>(rem));
  }
};

// y[a * ldy + b] = dot(x_a, w_b) for an NA x NB tile over k elements: one accumulator per pair,
// S::kStep elements a step, the last step masked, one final sum; every pair exactly as the 1 x 1
// tile (and so dot_rows, for decode) computes it.
template <typename S, int NA, int NB>
void TileT(const typename S::TX* x, int64_t ldx, const typename S::TW* w, int64_t ldw, int64_t k,
           float* y, int64_t ldy) {
  __m512 s[NA][NB];
  for (int a = 0; a < NA; ++a)
    for (int b = 0; b < NB; ++b) s[a][b] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + S::kStep <= k; i += S::kStep) {
    typename S::V wv[NB];
    for (int b = 0; b < NB; ++b) wv[b] = S::LoadW(w + b * ldw + i);
    for (int a = 0; a < NA; ++a) {
      const typename S::V xv = S::LoadX(x + a * ldx + i);
      for (int b = 0; b < NB; ++b) s[a][b] = S::Madd(s[a][b], xv, wv[b]);
    }
  }
  if (i < k) {
    typename S::V wv[NB];
    for (int b = 0; b < NB; ++b) wv[b] = S::LoadWTail(w + b * ldw + i, k - i);
    for (int a = 0; a < NA; ++a) {
      const typename S::V xv = S::LoadXTail(x + a * ldx + i, k - i);
      for (int b = 0; b < NB; ++b) s[a][b] = S::Madd(s[a][b], xv, wv[b]);
    }
  }
  for (int a = 0; a < NA; ++a) {
    if constexpr (NB == 4) {
      ReduceAdd4(s[a], y + a * ldy);
    } else {
      for (int b = 0; b < NB; ++b) y[a * ldy + b] = ReduceAdd(s[a][b]);
    }
  }
}

// Tiles of up to 6 tokens x 4 rows (24 accumulators); other shapes pair by pair.
template <typename S>
void Tile(const typename S::TX* x, int64_t ldx, const typename S::TW* w, int64_t ldw, int64_t k,
          int na, int nb, float* y, int64_t ldy) {
  if (nb == 4) {
    switch (na) {
      case 6:
        return TileT<S, 6, 4>(x, ldx, w, ldw, k, y, ldy);
      case 5:
        return TileT<S, 5, 4>(x, ldx, w, ldw, k, y, ldy);
      case 4:
        return TileT<S, 4, 4>(x, ldx, w, ldw, k, y, ldy);
      case 3:
        return TileT<S, 3, 4>(x, ldx, w, ldw, k, y, ldy);
      case 2:
        return TileT<S, 2, 4>(x, ldx, w, ldw, k, y, ldy);
      default:
        break;
    }
  }
  for (int a = 0; a < na; ++a) {
    for (int b = 0; b < nb; ++b)
      TileT<S, 1, 1>(x + a * ldx, ldx, w + b * ldw, ldw, k, y + a * ldy + b, ldy);
  }
}

// out[r] = dot(x, row r) for `rows` (1..4) rows of `k` elements of S::TW, `stride` apart: the
// 1 x rows tile, so decode sums every pair exactly as the prefill tiles do.
template <typename S>
void DotRowsS(const typename S::TX* x, const void* w, int64_t k, int64_t stride, int rows,
              float* out) {
  const auto* wt = static_cast<const typename S::TW*>(w);
  switch (rows) {
    case 4:
      return TileT<S, 1, 4>(x, k, wt, stride, k, out, 4);
    case 3:
      return TileT<S, 1, 3>(x, k, wt, stride, k, out, 3);
    case 2:
      return TileT<S, 1, 2>(x, k, wt, stride, k, out, 2);
    default:
      return TileT<S, 1, 1>(x, k, wt, stride, k, out, 1);
  }
}

void DotRowsStrided(const float* x, const void* w, int t, int64_t k, int64_t stride, int rows,
                    float* out) {
  if (t == kElemF32) return DotRowsS<F32Madd>(x, w, k, stride, rows, out);
  if (t == kElemBF16) return DotRowsS<Widen16Madd<kElemBF16>>(x, w, k, stride, rows, out);
  DotRowsS<Widen16Madd<kElemF16>>(x, w, k, stride, rows, out);
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

// Masked load of the elements of `m` at [i, i + 16).
inline __m512 LoadMasked(const void* p, int t, int64_t i, __mmask16 m) {
  if (t == kElemF32) return _mm512_maskz_loadu_ps(m, static_cast<const float*>(p) + i);
  const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(p) + i);
  if (t == kElemBF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  return _mm512_cvtph_ps(h);
}

void AccumulateRows(const float* p, const void* v, int t, int64_t d, int64_t stride, int64_t count,
                    float* acc) {
  // Up to 64 output elements (4 registers) per pass over the rows.
  for (int64_t e0 = 0; e0 < d; e0 += 64) {
    const int64_t width = d - e0 < 64 ? d - e0 : 64;
    const int regs = static_cast<int>((width + 15) / 16);
    __mmask16 mask[4];
    __m512 a[4];
    for (int r = 0; r < 4; ++r) {
      const int64_t rem = width - 16 * r;
      mask[r] = rem >= 16 ? static_cast<__mmask16>(0xffff)
                : rem > 0 ? static_cast<__mmask16>((1u << rem) - 1u)
                          : static_cast<__mmask16>(0);
      a[r] = _mm512_maskz_loadu_ps(mask[r], acc + e0 + 16 * r);
    }
    for (int64_t j = 0; j < count; ++j) {
      const void* row = RowPtr(v, t, stride, j);
      const __m512 pj = _mm512_set1_ps(p[j]);
      for (int r = 0; r < regs; ++r) {
        a[r] = _mm512_fmadd_ps(pj, LoadMasked(row, t, e0 + 16 * r, mask[r]), a[r]);
      }
    }
    for (int r = 0; r < regs; ++r) _mm512_mask_storeu_ps(acc + e0 + 16 * r, mask[r], a[r]);
  }
}

// Six probability rows over 64 of V's columns [e0, e0 + 64), from AccumulateTile.
void AccumulateTile6x64(const float* p, int64_t ldp, const void* v, int t, int64_t e0,
                        int64_t stride, int64_t count, float* acc, int64_t ldacc) {
  __m512 a[6][4];
  for (int i = 0; i < 6; ++i)
    for (int r = 0; r < 4; ++r) a[i][r] = _mm512_loadu_ps(acc + i * ldacc + e0 + 16 * r);
  for (int64_t j = 0; j < count; ++j) {
    const void* row = RowPtr(v, t, stride, j);
    __m512 vr[4];
    for (int r = 0; r < 4; ++r) vr[r] = Load16(row, t, e0 + 16 * r);
    for (int i = 0; i < 6; ++i) {
      const __m512 pj = _mm512_set1_ps(p[i * ldp + j]);
      for (int r = 0; r < 4; ++r) a[i][r] = _mm512_fmadd_ps(pj, vr[r], a[i][r]);
    }
  }
  for (int i = 0; i < 6; ++i)
    for (int r = 0; r < 4; ++r) _mm512_storeu_ps(acc + i * ldacc + e0 + 16 * r, a[i][r]);
}

// AccumulateRows for `na` probability rows at once: acc_i[e] += sum_j p_i[j] * row_j[e], every
// i exactly as AccumulateRows computes it (the same FMAs in the same order); six rows and whole
// 64-column passes load each V row once for all six, other shapes go row by row.
void AccumulateTile(const float* p, int64_t ldp, int na, const void* v, int t, int64_t d,
                    int64_t stride, int64_t count, float* acc, int64_t ldacc) {
  const int64_t whole = na == 6 ? d / 64 * 64 : 0;
  for (int64_t e0 = 0; e0 < whole; e0 += 64) {
    AccumulateTile6x64(p, ldp, v, t, e0, stride, count, acc, ldacc);
  }
  if (whole == d) return;
  // Columns [whole, d): per column the same FMAs in the same order, so the split changes nothing.
  const void* rest = static_cast<const uint8_t*>(v) + whole * (t == kElemF32 ? 4 : 2);
  for (int i = 0; i < na; ++i) {
    AccumulateRows(p + i * ldp, rest, t, d - whole, stride, count, acc + i * ldacc + whole);
  }
}

void ConvertRow(const void* src, int t, int64_t k, float* dst) {
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) _mm512_storeu_ps(dst + i, Load16(src, t, i));
  if (i < k) {
    const int rem = static_cast<int>(k - i);
    _mm512_mask_storeu_ps(dst + i, static_cast<__mmask16>((1u << rem) - 1u),
                          LoadTail(src, t, i, rem));
  }
}

void TileF32(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t k, int na, int nb,
             float* y, int64_t ldy) {
  Tile<F32Madd>(x, ldx, w, ldw, k, na, nb, y, ldy);
}

void TileWiden16(const float* x, int64_t ldx, const void* w, int t, int64_t ldw, int64_t k, int na,
                 int nb, float* y, int64_t ldy) {
  const auto* w16 = static_cast<const uint16_t*>(w);
  if (t == kElemBF16) return Tile<Widen16Madd<kElemBF16>>(x, ldx, w16, ldw, k, na, nb, y, ldy);
  Tile<Widen16Madd<kElemF16>>(x, ldx, w16, ldw, k, na, nb, y, ldy);
}

// exp(x) for x <= 0 (softmax arguments): x = n ln2 + r with |r| <= ln2 / 2, exp(r) by its
// degree-6 Taylor polynomial, times 2^n built in the exponent bits; 0 below -87 (and for -inf).
inline __m512 ExpNonPositive(__m512 x) {
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.f), _CMP_LT_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln2 in two parts
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 720.f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  const __m512i e = _mm512_slli_epi32(_mm512_cvtps_epi32(n), 23);
  const __m512 y = _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(p), e));
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~tiny), y);
}

// silu(g) * up with e = exp(-|g|) <= 1: g / (1 + e) for g >= 0, g e / (1 + e) below.
inline __m512 SiluMul16(__m512 g, __m512 up) {
  const __m512 e = ExpNonPositive(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(g)));
  const __mmask16 neg = _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ);
  const __m512 num = _mm512_mask_blend_ps(neg, _mm512_set1_ps(1.f), e);
  const __m512 sig = _mm512_div_ps(num, _mm512_add_ps(_mm512_set1_ps(1.f), e));
  return _mm512_mul_ps(_mm512_mul_ps(g, sig), up);
}

void SiluMul(const float* gate, const float* up, int64_t count, float* out) {
  for (int64_t i = 0; i < count; i += 16) {
    const int64_t rem = count - i;
    const auto m = static_cast<__mmask16>(rem >= 16 ? 0xffff : (1u << rem) - 1u);
    _mm512_mask_storeu_ps(
        out + i, m,
        SiluMul16(_mm512_maskz_loadu_ps(m, gate + i), _mm512_maskz_loadu_ps(m, up + i)));
  }
}

float ExpSum(float* p, int64_t count, float max) {
  const __m512 m = _mm512_set1_ps(max);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < count; j += 16) {
    const int64_t rem = count - j;
    const auto mask = static_cast<__mmask16>(rem >= 16 ? 0xffff : (1u << rem) - 1u);
    const __m512 e = ExpNonPositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, p + j), m));
    _mm512_mask_storeu_ps(p + j, mask, e);
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(mask, e));
  }
  return _mm512_reduce_add_ps(sum);
}

#include "kernels/cpu/simd_quant_inl.h"  // NOLINT(build/include): this unit's own copy

// Per 32-bit lane, the sum of its four u8 x s8 products, added to `acc`: VNNI's vpdpbusd, or
// AVX512BW's maddubs (pairs to int16; at most 2 x 127 x 127, no saturation) and madd.
inline __m512i DotU8S8(__m512i acc, __m512i u, __m512i s) {
#ifdef KVGATE_SIMD_VNNI
  return _mm512_dpbusd_epi32(acc, u, s);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1)));
#endif
}

// How far ahead of the bytes being read the quantized products prefetch: rows are read one
// after the other, each in one pass, but a row (1-2 KiB) is too short for the hardware
// prefetchers to reach full speed before it ends. 8 KiB measured best on an AMD EPYC (4 and
// 16 KiB slower).
constexpr int64_t kAheadBytes = 8192;

// One whole row with 512-bit products: q8_0 two blocks per load, q4_0 a chunk of four blocks
// (both nibble halves) per load; each block's scale (weight x activation, 16 blocks converted at
// a time) spread over its 8 lanes by one permute. q4_0 takes the nibbles unsigned and subtracts
// 8 x scale x (the activation block's sum) at the end. Blocks left over (q8_0: an odd last one;
// q4_0: the last blocks % 4) go through the 256-bit path.
float DotRowQuant512(const int8_t* xq, const float* xs, const float* xsum, const uint8_t* row,
                     int quant, int64_t blocks) {
  const bool q8 = quant == kQuantQ8_0;
  const int64_t fast = q8 ? blocks / 2 * 2 : blocks / 4 * 4;
  const __m512i pair = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m512i zero = _mm512_setzero_si512();
  const __m512i low4 = _mm512_set1_epi8(0x0f);
  const uint8_t* values = row + 2 * blocks;
  const char* ahead = reinterpret_cast<const char*>(row + kAheadBytes);
  __m512 acc = _mm512_setzero_ps(), corr = _mm512_setzero_ps();
  for (int64_t g = 0; g < fast; g += 16) {
    const int nb = static_cast<int>(fast - g < 16 ? fast - g : 16);
    const auto m = static_cast<__mmask16>(nb == 16 ? 0xffff : (1u << nb) - 1u);
    _mm_prefetch(ahead + 2 * g, _MM_HINT_T0);
    // Weight scale x activation scale of blocks g .. g + 15.
    const __m512 c = _mm512_mul_ps(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, row + 2 * g)),
                                   _mm512_maskz_loadu_ps(m, xs + g));
    if (q8) {
      for (int p = 0; p < nb; p += 2) {
        const __m512i x = _mm512_loadu_si512(xq + (g + p) * 32);
        _mm_prefetch(ahead + 2 * blocks + (g + p) * 32, _MM_HINT_T0);
        __m512i wv = _mm512_loadu_si512(values + (g + p) * 32);
        wv = _mm512_mask_sub_epi8(wv, _mm512_movepi8_mask(x), zero, wv);  // w with x's sign
        const __m512i s = DotU8S8(zero, _mm512_abs_epi8(x), wv);
        const __m512i idx = _mm512_add_epi32(pair, _mm512_set1_epi32(p));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_permutexvar_ps(idx, c), acc);
      }
    } else {
      corr = _mm512_fmadd_ps(c, _mm512_maskz_loadu_ps(m, xsum + g), corr);
      for (int p = 0; p < nb; p += 4) {
        _mm_prefetch(ahead + 2 * blocks + (g + p) * 16, _MM_HINT_T0);
        const __m512i v = _mm512_loadu_si512(values + (g + p) * 16);
        const __m512i lo = _mm512_and_si512(v, low4);                        // blocks p, p + 1
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);  // p + 2, p + 3
        const __m512i xlo = _mm512_loadu_si512(xq + (g + p) * 32);
        const __m512i xhi = _mm512_loadu_si512(xq + (g + p) * 32 + 64);
        const __m512i idx_lo = _mm512_add_epi32(pair, _mm512_set1_epi32(p));
        const __m512i idx_hi = _mm512_add_epi32(pair, _mm512_set1_epi32(p + 2));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(DotU8S8(zero, lo, xlo)),
                              _mm512_permutexvar_ps(idx_lo, c), acc);
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(DotU8S8(zero, hi, xhi)),
                              _mm512_permutexvar_ps(idx_hi, c), acc);
      }
    }
  }
  float out = _mm512_reduce_add_ps(acc) - 8.f * _mm512_reduce_add_ps(corr);
  if (fast < blocks) DotRowsQuantBlocks<1>(xq, xs, row, quant, blocks, fast, &out);
  return out;
}

// Rows one after the other: one sequential stream through memory, which the prefetchers follow
// better than several rows read in turns.
template <int R>
void DotRowsQuantT(const int8_t* xq, const float* xs, const float* xsum, const uint8_t* w,
                   int quant, int64_t blocks, float* out) {
  const int64_t row_bytes = blocks * (quant == kQuantQ8_0 ? 34 : 18);
  for (int r = 0; r < R; ++r) {
    out[r] = DotRowQuant512(xq, xs, xsum, w + r * row_bytes, quant, blocks);
  }
}

float ScaleMax(float* p, int64_t count, float scale) {
  const __m512 sc = _mm512_set1_ps(scale);
  __m512 mx = _mm512_set1_ps(-__builtin_inff());
  for (int64_t j = 0; j < count; j += 16) {
    const __mmask16 m = count - j >= 16 ? static_cast<__mmask16>(0xffff)
                                        : static_cast<__mmask16>((1u << (count - j)) - 1u);
    const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, p + j), sc);
    _mm512_mask_storeu_ps(p + j, m, v);
    mx = _mm512_mask_max_ps(mx, m, v, mx);  // (v > mx) ? v : mx, as std::max(mx, v)
  }
  return _mm512_reduce_max_ps(mx);
}

// r[i] lane j -> r[j] lane i: unpacks within 128-bit lanes, then 128-bit lane shuffles.
inline void Transpose16(__m512 (&r)[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xee);
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xee);
  }
  for (int half = 0; half < 16; half += 8) {
    for (int i = half; i < half + 4; ++i) {
      t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
      t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
    }
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
  }
}

void RowsToPanel(const float* rows, int64_t ld, int nrows, int64_t k, float* panel) {
  for (int64_t c0 = 0; c0 < k; c0 += 16) {
    const int64_t cols = k - c0 < 16 ? k - c0 : 16;
    const auto m = static_cast<__mmask16>((1u << cols) - 1u);
    __m512 r[16];
    for (int i = 0; i < 16; ++i) {
      r[i] = i < nrows ? _mm512_maskz_loadu_ps(m, rows + i * ld + c0) : _mm512_setzero_ps();
    }
    Transpose16(r);
    for (int64_t j = 0; j < cols; ++j) _mm512_storeu_ps(panel + (c0 + j) * 16, r[j]);
  }
}

// Panel columns as float32: stored float32, or 16-bit ones (type kType) widened.
struct PanelF32 {
  using T = float;
  static __m512 Load(const float* p) { return _mm512_loadu_ps(p); }
};
template <int kType>
struct Panel16 {
  using T = uint16_t;
  static __m512 Load(const uint16_t* p) { return Load16(p, kType, 0); }
};

// An MR x NP panel tile: MR tokens against NP panels of 16 weight rows, one accumulator per
// (token, panel) summing its 16 outputs in index order, the token's element broadcast.
template <typename L, int MR, int NP>
void PanelTileT(const float* x, int64_t ldx, const typename L::T* w, int64_t k, float* y,
                int64_t ldy, int64_t cols) {
  __m512 c[MR][NP];
  for (int a = 0; a < MR; ++a)
    for (int b = 0; b < NP; ++b) c[a][b] = _mm512_setzero_ps();
  const int64_t panel = k * 16;
  for (int64_t i = 0; i < k; ++i) {
    __m512 wv[NP];
    for (int b = 0; b < NP; ++b) wv[b] = L::Load(w + b * panel + i * 16);
    for (int a = 0; a < MR; ++a) {
      const __m512 xv = _mm512_set1_ps(x[a * ldx + i]);
      for (int b = 0; b < NP; ++b) c[a][b] = _mm512_fmadd_ps(xv, wv[b], c[a][b]);
    }
  }
  for (int b = 0; b < NP; ++b) {
    const int64_t left = cols - b * 16;
    const __mmask16 m =
        left >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << left) - 1u);
    for (int a = 0; a < MR; ++a) _mm512_mask_storeu_ps(y + a * ldy + b * 16, m, c[a][b]);
  }
}

// Up to 24 accumulators: 3..6 tokens take 4 panels a pass, 1 or 2 tokens take 8 (enough
// independent sums to keep both FMA units busy).
template <typename L, int MR>
void PanelTileTokens(const float* x, int64_t ldx, const typename L::T* w, int np, int64_t k,
                     float* y, int64_t ldy, int64_t cols) {
  constexpr int kChunk = MR <= 2 ? 8 : 4;
  for (int p0 = 0; p0 < np; p0 += kChunk) {
    const typename L::T* wp = w + p0 * k * 16;
    float* yp = y + p0 * 16;
    const int64_t left = cols - p0 * 16;
    switch (np - p0 < kChunk ? np - p0 : kChunk) {
      case 1:
        PanelTileT<L, MR, 1>(x, ldx, wp, k, yp, ldy, left);
        break;
      case 2:
        PanelTileT<L, MR, 2>(x, ldx, wp, k, yp, ldy, left);
        break;
      case 3:
        PanelTileT<L, MR, 3>(x, ldx, wp, k, yp, ldy, left);
        break;
      case 4:
        PanelTileT<L, MR, 4>(x, ldx, wp, k, yp, ldy, left);
        break;
      default:
        if constexpr (kChunk == 8) {
          switch (np - p0 < 8 ? np - p0 : 8) {
            case 5:
              PanelTileT<L, MR, 5>(x, ldx, wp, k, yp, ldy, left);
              break;
            case 6:
              PanelTileT<L, MR, 6>(x, ldx, wp, k, yp, ldy, left);
              break;
            case 7:
              PanelTileT<L, MR, 7>(x, ldx, wp, k, yp, ldy, left);
              break;
            default:
              PanelTileT<L, MR, 8>(x, ldx, wp, k, yp, ldy, left);
              break;
          }
        }
        break;
    }
  }
}

#include "kernels/cpu/simd_panel_inl.h"  // NOLINT(build/include): this unit's own copy

#ifdef KVGATE_SIMD_BF16
// bf16 pairs with vdpbf16ps, 32 elements a step.
struct Bf16Madd {
  using TX = uint16_t;
  using TW = uint16_t;
  using V = __m512bh;
  static constexpr int kStep = 32;
  static V LoadX(const uint16_t* p) { return reinterpret_cast<__m512bh>(_mm512_loadu_si512(p)); }
  static V LoadXTail(const uint16_t* p, int64_t rem) {
    return reinterpret_cast<__m512bh>(
        _mm512_maskz_loadu_epi16(static_cast<__mmask32>((1ull << rem) - 1ull), p));
  }
  static V LoadW(const uint16_t* p) { return LoadX(p); }
  static V LoadWTail(const uint16_t* p, int64_t rem) { return LoadXTail(p, rem); }
  static __m512 Madd(__m512 acc, V x, V w) { return _mm512_dpbf16_ps(acc, x, w); }
};

void TileBf16(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t ldw, int64_t k, int na,
              int nb, float* y, int64_t ldy) {
  Tile<Bf16Madd>(x, ldx, w, ldw, k, na, nb, y, ldy);
}

void DotRowsBf16(const uint16_t* x, const uint16_t* w, int64_t k, int rows, float* out) {
  DotRowsS<Bf16Madd>(x, w, k, k, rows, out);
}

void ToBf16(const float* src, int64_t k, uint16_t* dst) {
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_loadu_ps(src + i))));
  }
  if (i < k) {
    const auto m = static_cast<__mmask16>((1u << static_cast<int>(k - i)) - 1u);
    _mm256_mask_storeu_epi16(
        dst + i, m,
        reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, src + i))));
  }
}
#endif  // KVGATE_SIMD_BF16

}  // namespace

namespace {
// This unit's loops (every variant of the unit has them).
Kernels Avx512Common() {
  Kernels k{&DotRows,   &ConvertRow,     &TileF32, &DotRowsQuant,
            &ScoreRows, &AccumulateRows, &ExpSum,  &DequantizeRowSimd};
  k.tile_tokens = 6;
  k.tile_widen16 = &TileWiden16;
  k.accumulate_tile = &AccumulateTile;
  k.silu_mul = &SiluMul;
  k.panel_tile = &PanelTile;
  k.panel_tile16 = &PanelTile16;
  k.scale_max = &ScaleMax;
  k.rows_to_panel = &RowsToPanel;
  return k;
}
}  // namespace

#if defined(KVGATE_SIMD_BF16)
Kernels Avx512Bf16Kernels() {
  Kernels k = Avx512Common();
  k.dot_rows_bf16 = &DotRowsBf16;
  k.tile_bf16 = &TileBf16;
  k.to_bf16 = &ToBf16;
  return k;
}
#elif defined(KVGATE_SIMD_VNNI)
Kernels Avx512VnniKernels() { return Avx512Common(); }
#else
Kernels Avx512Kernels() { return Avx512Common(); }
#endif

}  // namespace kvgate::kernels::cpu::simd
