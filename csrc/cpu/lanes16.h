// 16 fp32 lanes, the width of one tile (tiled_kernels.h): one zmm register with AVX-512,
// a pair of ymm registers with AVX2. The tile kernel is written once against these helpers;
// the CPU it is built for (-march=native) picks the implementation.
#pragma once

#include <cstdint>

#include "cpu/kernels.h"

namespace bs_lightning::cpu {

#if defined(__AVX512F__)
#define BS_LIGHTNING_LANES16 1  // F16 and its helpers exist (tested with #if by the kernels)
constexpr const char* kLanesIsa = "avx512";

struct F16 {  // 16 floats
  __m512 v;
};
struct I16 {  // 16 int32 in-bank indices
  __m512i v;
};

// Lanes [0, n) set, n clamped to [0, 16].
inline __mmask16 prefix_mask(int64_t n) {
  if (n <= 0) return 0;
  if (n >= 16) return 0xFFFF;
  return static_cast<__mmask16>((1u << n) - 1u);
}

inline F16 zero16() { return {_mm512_setzero_ps()}; }
inline F16 broadcast16(float v) { return {_mm512_set1_ps(v)}; }
inline F16 add16(F16 a, F16 b) { return {_mm512_add_ps(a.v, b.v)}; }
inline F16 fmadd16(F16 a, F16 b, F16 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
template <typename V>
inline F16 values16(const V* p) {
  return {load16(p)};
}
inline I16 indices16(const uint8_t* p) {
  return {_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
}
// p[0, n) and zeros in the lanes past n; reads nothing past p + n.
inline F16 load_prefix16(const float* p, int64_t n) {
  return {_mm512_maskz_loadu_ps(prefix_mask(n), p)};
}
inline void store_prefix16(float* p, F16 a, int64_t n) {
  _mm512_mask_storeu_ps(p, prefix_mask(n), a.v);
}
inline void store16(float* p, F16 a) { _mm512_storeu_ps(p, a.v); }

// x_bank[ix[l]] for 16 lanes, the bank's x slice held in NREG vectors (16 * NREG floats):
// vpermps / vpermi2ps, one or two per lookup.
template <int NREG>
inline F16 lookup16(const F16* xr, I16 ix);
template <>
inline F16 lookup16<1>(const F16* xr, I16 ix) {
  return {_mm512_permutexvar_ps(ix.v, xr[0].v)};
}
template <>
inline F16 lookup16<2>(const F16* xr, I16 ix) {
  return {_mm512_permutex2var_ps(xr[0].v, ix.v, xr[1].v)};  // low 5 bits of ix select
}
template <>
inline F16 lookup16<4>(const F16* xr, I16 ix) {
  const __m512 lo = _mm512_permutex2var_ps(xr[0].v, ix.v, xr[1].v);
  const __m512 hi = _mm512_permutex2var_ps(xr[2].v, ix.v, xr[3].v);
  return {_mm512_mask_blend_ps(_mm512_test_epi32_mask(ix.v, _mm512_set1_epi32(32)), lo, hi)};
}

#elif defined(__AVX2__) && defined(__FMA__)
#define BS_LIGHTNING_LANES16 1
constexpr const char* kLanesIsa = "avx2";

struct F16 {  // floats 0-7 in lo, 8-15 in hi
  __m256 lo, hi;
};
struct I16 {
  __m256i lo, hi;
};

// int32 lanes [0, n) all ones, n clamped to [0, 8]: the mask of vmaskmovps.
inline __m256i prefix_mask8(int64_t n) {
  const int32_t c = static_cast<int32_t>(n < 0 ? 0 : (n > 8 ? 8 : n));
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(c), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

inline F16 zero16() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline F16 broadcast16(float v) { return {_mm256_set1_ps(v), _mm256_set1_ps(v)}; }
inline F16 add16(F16 a, F16 b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline F16 fmadd16(F16 a, F16 b, F16 c) {
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
template <typename V>
inline F16 values16(const V* p) {
  return {load8(p), load8(p + 8)};
}
inline I16 indices16(const uint8_t* p) {
  return {_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))),
          _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8)))};
}
// p[0, n) and zeros in the lanes past n; reads nothing past p + n.
inline F16 load_prefix16(const float* p, int64_t n) {
  if (n >= 16) return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)};
  return {_mm256_maskload_ps(p, prefix_mask8(n)), _mm256_maskload_ps(p + 8, prefix_mask8(n - 8))};
}
inline void store_prefix16(float* p, F16 a, int64_t n) {
  _mm256_maskstore_ps(p, prefix_mask8(n), a.lo);
  _mm256_maskstore_ps(p + 8, prefix_mask8(n - 8), a.hi);
}
inline void store16(float* p, F16 a) {
  _mm256_storeu_ps(p, a.lo);
  _mm256_storeu_ps(p + 8, a.hi);
}

// Eight lanes of lookup16: vpermps picks within 8 floats by bits 0-2 of the index; blends
// on bits 3, 4 and 5 (shifted into the sign bit that vblendvps reads) pick the 8-float
// block. NREG = 2 (bank 32): 4 permutes and 3 blends per 8 lanes.
template <int NREG>
inline __m256 lookup8(const F16* xr, __m256i ix) {
  const __m256 bit3 = _mm256_castsi256_ps(_mm256_slli_epi32(ix, 28));
  __m256 p[NREG];
#pragma GCC unroll 4
  for (int r = 0; r < NREG; ++r) {
    p[r] = _mm256_blendv_ps(_mm256_permutevar8x32_ps(xr[r].lo, ix),
                            _mm256_permutevar8x32_ps(xr[r].hi, ix), bit3);
  }
  if constexpr (NREG == 1) {
    return p[0];
  } else {
    const __m256 bit4 = _mm256_castsi256_ps(_mm256_slli_epi32(ix, 27));
    const __m256 q0 = _mm256_blendv_ps(p[0], p[1], bit4);
    if constexpr (NREG == 2) {
      return q0;
    } else {
      static_assert(NREG == 4, "x slice of 16, 32 or 64 floats");
      const __m256 q1 = _mm256_blendv_ps(p[2], p[3], bit4);
      return _mm256_blendv_ps(q0, q1, _mm256_castsi256_ps(_mm256_slli_epi32(ix, 26)));
    }
  }
}
template <int NREG>
inline F16 lookup16(const F16* xr, I16 ix) {
  return {lookup8<NREG>(xr, ix.lo), lookup8<NREG>(xr, ix.hi)};
}
#endif

#if defined(BS_LIGHTNING_LANES16)
// Writes the first `valid` of 16 lanes to dst (converted to V).
template <typename V>
inline void store_row(V* dst, F16 r, int64_t valid) {
  alignas(64) float f[16];
  store16(f, r);
  for (int64_t l = 0; l < valid; ++l) dst[l] = static_cast<V>(f[l]);
}
template <>
inline void store_row<float>(float* dst, F16 r, int64_t valid) {
  store_prefix16(dst, r, valid);
}
#else
constexpr const char* kLanesIsa = "portable";
#endif

}  // namespace bs_lightning::cpu
