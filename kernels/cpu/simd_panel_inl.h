// The panel tiles' entry points (simd.h: PanelTileFn, PanelTile16Fn) over this unit's
// PanelTileTokens<Loader, tokens> and its loaders PanelF32 and Panel16<type>. Textually included
// by simd_avx2.cc and simd_avx512.cc inside their anonymous namespace, after those, so each ISA
// unit compiles its own copy with its own flags. Not a standalone header.

void PanelTile(const float* x, int64_t ldx, int na, const float* w, int np, int64_t k, float* y,
               int64_t ldy, int64_t cols) {
  switch (na) {
    case 1:
      return PanelTileTokens<PanelF32, 1>(x, ldx, w, np, k, y, ldy, cols);
    case 2:
      return PanelTileTokens<PanelF32, 2>(x, ldx, w, np, k, y, ldy, cols);
    case 3:
      return PanelTileTokens<PanelF32, 3>(x, ldx, w, np, k, y, ldy, cols);
    case 4:
      return PanelTileTokens<PanelF32, 4>(x, ldx, w, np, k, y, ldy, cols);
    case 5:
      return PanelTileTokens<PanelF32, 5>(x, ldx, w, np, k, y, ldy, cols);
    default:
      return PanelTileTokens<PanelF32, 6>(x, ldx, w, np, k, y, ldy, cols);
  }
}

// Decode only: one or two tokens.
template <int kType>
void PanelTile16T(const float* x, int64_t ldx, int na, const uint16_t* w, int np, int64_t k,
                  float* y, int64_t ldy, int64_t cols) {
  if (na == 1) return PanelTileTokens<Panel16<kType>, 1>(x, ldx, w, np, k, y, ldy, cols);
  PanelTileTokens<Panel16<kType>, 2>(x, ldx, w, np, k, y, ldy, cols);
}

void PanelTile16(const float* x, int64_t ldx, int na, const uint16_t* w, int t, int np, int64_t k,
                 float* y, int64_t ldy, int64_t cols) {
  if (t == kElemBF16) return PanelTile16T<kElemBF16>(x, ldx, na, w, np, k, y, ldy, cols);
  PanelTile16T<kElemF16>(x, ldx, na, w, np, k, y, ldy, cols);
}
