// AVX-512 (F + BW + VL) inner loops. Compiled with -mavx512f -mavx512bw -mavx512vl -mfma -mf16c.
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

inline const void* RowPtr(const void* w, int t, int64_t k, int r) {
  const int64_t bytes = t == kElemF32 ? 4 : 2;
  return static_cast<const uint8_t*>(w) + r * k * bytes;
}

template <int R>
void DotRowsT(const float* x, const void* w, int t, int64_t k, float* out) {
  __m512 acc[R];
  const void* rows[R];
  for (int r = 0; r < R; ++r) {
    acc[r] = _mm512_setzero_ps();
    rows[r] = RowPtr(w, t, k, r);
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

void DotRows(const float* x, const void* w, int t, int64_t k, int rows, float* out) {
  switch (rows) {
    case 4:
      return DotRowsT<4>(x, w, t, k, out);
    case 3:
      return DotRowsT<3>(x, w, t, k, out);
    case 2:
      return DotRowsT<2>(x, w, t, k, out);
    default:
      return DotRowsT<1>(x, w, t, k, out);
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
        DotRowsT<1>(x + a * ldx, w + b * ldw, kElemF32, k, &out);
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

Kernels Avx512Kernels() { return Kernels{&DotRows, &ConvertRow, &Tile4x4, &DotRowsQuant}; }

}  // namespace kvgate::kernels::cpu::simd
