// AVX-512 (F + BW + VL) inner loops. Compiled with -mavx512f -mavx512bw -mavx512vl -mfma -mf16c,
// and once more with -mavx512vnni -DKVGATE_SIMD_VNNI for Avx512VnniKernels.
// GCC 12's AVX-512 intrinsics start from a self-initialized `__Y` (_mm512_undefined_*), which
// -Wmaybe-uninitialized reports wherever they inline into a loop; the value is never read.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
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

// Row `r` of `w`, rows `stride` elements of type `t` apart.
inline const void* RowPtr(const void* w, int t, int64_t stride, int64_t r) {
  const int64_t bytes = t == kElemF32 ? 4 : 2;
  return static_cast<const uint8_t*>(w) + r * stride * bytes;
}

// out[r] = dot(x, row r) for R rows of `k` elements, `stride` elements apart.
template <int R>
void DotRowsT(const float* x, const void* w, int t, int64_t k, float* out, int64_t stride) {
  __m512 acc[R];
  const void* rows[R];
  for (int r = 0; r < R; ++r) {
    acc[r] = _mm512_setzero_ps();
    rows[r] = RowPtr(w, t, stride, r);
  }
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    const __m512 xv = _mm512_loadu_ps(x + i);
    for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(xv, Load16(rows[r], t, i), acc[r]);
  }
  if (i < k) {
    const int rem = static_cast<int>(k - i);
    const __m512 xv = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << rem) - 1u), x + i);
    for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(xv, LoadTail(rows[r], t, i, rem), acc[r]);
  }
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
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

void ConvertRow(const void* src, int t, int64_t k, float* dst) {
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) _mm512_storeu_ps(dst + i, Load16(src, t, i));
  if (i < k) {
    const int rem = static_cast<int>(k - i);
    _mm512_mask_storeu_ps(dst + i, static_cast<__mmask16>((1u << rem) - 1u),
                          LoadTail(src, t, i, rem));
  }
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
  __m512 acc[4][4];
  for (int a = 0; a < 4; ++a)
    for (int b = 0; b < 4; ++b) acc[a][b] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    __m512 wv[4];
    for (int b = 0; b < 4; ++b) wv[b] = _mm512_loadu_ps(w + b * ldw + i);
    for (int a = 0; a < 4; ++a) {
      const __m512 xv = _mm512_loadu_ps(x + a * ldx + i);
      for (int b = 0; b < 4; ++b) acc[a][b] = _mm512_fmadd_ps(xv, wv[b], acc[a][b]);
    }
  }
  if (i < k) {
    const __mmask16 m = static_cast<__mmask16>((1u << static_cast<int>(k - i)) - 1u);
    __m512 wv[4];
    for (int b = 0; b < 4; ++b) wv[b] = _mm512_maskz_loadu_ps(m, w + b * ldw + i);
    for (int a = 0; a < 4; ++a) {
      const __m512 xv = _mm512_maskz_loadu_ps(m, x + a * ldx + i);
      for (int b = 0; b < 4; ++b) acc[a][b] = _mm512_fmadd_ps(xv, wv[b], acc[a][b]);
    }
  }
  for (int a = 0; a < 4; ++a)
    for (int b = 0; b < 4; ++b) y[a * ldy + b] = _mm512_reduce_add_ps(acc[a][b]);
}

#include "kernels/cpu/simd_quant_inl.h"  // NOLINT(build/include): this unit's own copy

}  // namespace

#ifdef KVGATE_SIMD_VNNI
Kernels Avx512VnniKernels() {
#else
Kernels Avx512Kernels() {
#endif
  return Kernels{&DotRows, &ConvertRow, &Tile4x4, &DotRowsQuant, &ScoreRows, &AccumulateRows};
}

}  // namespace kvgate::kernels::cpu::simd
