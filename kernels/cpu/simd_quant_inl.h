// The quantized dot products (q8_0 / q4_0 weights against int8 activation blocks) with
// 256-bit integer instructions (AVX2; AVX-512 CPUs run the same). Textually included by
// simd_avx2.cc and simd_avx512.cc inside their anonymous namespace, so each ISA unit compiles
// its own copy with its own flags and nothing leaks between them. Not a standalone header.

// Block `b`'s 32 weights as int8 (q4_0's nibbles less 8), in the row layout of
// kernels/cpu/quant.h: `values` is the row's values, after its `blocks` f16 scales.
inline __m256i LoadQuantWeights(const uint8_t* values, int64_t blocks, int64_t b, int quant) {
  if (quant == kQuantQ8_0) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(values + b * 32));
  }
  const __m256i mask = _mm256_set1_epi8(0x0f);
  const int64_t chunked = blocks / 4 * 4;
  if (b < chunked) {  // a chunk's 64 bytes: blocks 0, 1 in the low nibbles, 2, 3 in the high
    const __m256i v =
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(values + b / 4 * 64 + (b % 2) * 32));
    const __m256i nib =
        (b % 4) < 2 ? _mm256_and_si256(v, mask) : _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
    return _mm256_sub_epi8(nib, _mm256_set1_epi8(8));
  }
  const __m128i v =
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(values + chunked * 16 + (b - chunked) * 16));
  const __m128i m = _mm_set1_epi8(0x0f);
  const __m128i lo = _mm_and_si128(v, m);                     // elements 0..15
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), m);  // elements 16..31
  return _mm256_sub_epi8(_mm256_set_m128i(hi, lo), _mm256_set1_epi8(8));
}

// The f16 scale at `p` as a float.
inline float QuantScale(const uint8_t* p) {
  uint16_t h;
  __builtin_memcpy(&h, p, 2);
  return _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h)));
}

// The 8 partial sums of dot(x, w) over 32 int8 pairs, as floats. |x| <= 127 and |w| <= 127, so
// maddubs's int16 pair sums (at most 2 * 127 * 127) never saturate.
inline __m256 DotBlock32(__m256i x, __m256i w) {
  const __m256i ax = _mm256_sign_epi8(x, x);  // |x|
  const __m256i sw = _mm256_sign_epi8(w, x);  // w with x's sign
#ifdef KVGATE_SIMD_VNNI
  // vpdpbusd: the four u8 x s8 products of each int32 lane summed in one instruction.
  return _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), ax, sw));
#endif
  const __m256i p16 = _mm256_maddubs_epi16(ax, sw);
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
}

inline float HSum256(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  lo = _mm_add_ps(lo, _mm256_extractf128_ps(v, 1));
  __m128 sh = _mm_movehdup_ps(lo);
  lo = _mm_add_ps(lo, sh);
  sh = _mm_movehl_ps(sh, lo);
  return _mm_cvtss_f32(_mm_add_ss(lo, sh));
}

// out[r] += sum over blocks [first, blocks) of row r, one block at a time (256-bit).
template <int R>
void DotRowsQuantBlocks(const int8_t* xq, const float* xs, const uint8_t* w, int quant,
                        int64_t blocks, int64_t first, float* out) {
  const int64_t row_bytes = blocks * (quant == kQuantQ8_0 ? 34 : 18);
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = first; b < blocks; ++b) {
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * 32));
    for (int r = 0; r < R; ++r) {
      const uint8_t* row = w + r * row_bytes;
      const __m256 d = _mm256_set1_ps(xs[b] * QuantScale(row + 2 * b));
      acc[r] = _mm256_fmadd_ps(DotBlock32(xv, LoadQuantWeights(row + 2 * blocks, blocks, b, quant)),
                               d, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] += HSum256(acc[r]);
}

void DequantizeRowSimd(const void* row, int quant, int64_t blocks, float* dst) {
  const auto* r = static_cast<const uint8_t*>(row);
  for (int64_t b = 0; b < blocks; ++b) {
    const __m256i v = LoadQuantWeights(r + 2 * blocks, blocks, b, quant);
    const __m256 d = _mm256_set1_ps(QuantScale(r + 2 * b));
    const __m128i lo = _mm256_castsi256_si128(v), hi = _mm256_extracti128_si256(v, 1);
    float* o = dst + b * 32;
    _mm256_storeu_ps(o, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo))));
    _mm256_storeu_ps(
        o + 8, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)))));
    _mm256_storeu_ps(o + 16, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi))));
    _mm256_storeu_ps(
        o + 24, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)))));
  }
}

// out[r] = the whole row r's sum: each ISA unit defines it after including this file.
template <int R>
void DotRowsQuantT(const int8_t* xq, const float* xs, const float* xsum, const uint8_t* w,
                   int quant, int64_t blocks, float* out);

void DotRowsQuant(const int8_t* xq, const float* xs, const float* xsum, const void* w, int quant,
                  int64_t blocks, int rows, float* out) {
  const auto* p = static_cast<const uint8_t*>(w);
  switch (rows) {
    case 4:
      return DotRowsQuantT<4>(xq, xs, xsum, p, quant, blocks, out);
    case 3:
      return DotRowsQuantT<3>(xq, xs, xsum, p, quant, blocks, out);
    case 2:
      return DotRowsQuantT<2>(xq, xs, xsum, p, quant, blocks, out);
    default:
      return DotRowsQuantT<1>(xq, xs, xsum, p, quant, blocks, out);
  }
}
