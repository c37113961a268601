// CPU inner loop of the tiled balanced product (docs/ARCHITECTURE.md section 3, "CPU tile
// layout"). Rows are grouped in tiles of 16; a tile stores, for every entry j of its rows,
// the 16 rows' values (one 64-byte line of fp32) and their 16 uint8 in-bank indices.
//
// All 16 rows of a tile read entry j from the same bank, so the bank's slice of x (up to 64
// floats) is held in 1, 2 or 4 zmm registers and each entry becomes one in-register
// permute (vpermps / vpermi2ps) instead of a 16-load gather: the loop is then bound by the
// bytes of the compact weight, not by instructions.
#pragma once

#include <algorithm>
#include <cstdint>

#include "cpu/kernels.h"

namespace bs_lightning::cpu {

constexpr int64_t kTileRows = 16;      // rows per tile = fp32 lanes of a zmm register
constexpr int64_t kMaxTiledBank = 64;  // x slice of a bank in at most 4 zmm registers
constexpr int64_t kTilePrefetchBytes = 4096;  // software prefetch distance (values stream)

#if defined(__AVX512F__)
constexpr bool kTiledVectorised = true;

// Lanes [0, n) set, n clamped to [0, 16].
inline __mmask16 prefix_mask(int64_t n) {
  if (n <= 0) return 0;
  if (n >= 16) return 0xFFFF;
  return static_cast<__mmask16>((1u << n) - 1u);
}

// x_bank[ix[l]] for 16 lanes, the bank's x slice held in NREG registers (16 * NREG floats).
template <int NREG>
inline __m512 lookup(const __m512* xr, __m512i ix);
template <>
inline __m512 lookup<1>(const __m512* xr, __m512i ix) {
  return _mm512_permutexvar_ps(ix, xr[0]);
}
template <>
inline __m512 lookup<2>(const __m512* xr, __m512i ix) {
  return _mm512_permutex2var_ps(xr[0], ix, xr[1]);  // low 5 bits of ix select
}
template <>
inline __m512 lookup<4>(const __m512* xr, __m512i ix) {
  const __m512 lo = _mm512_permutex2var_ps(xr[0], ix, xr[1]);
  const __m512 hi = _mm512_permutex2var_ps(xr[2], ix, xr[3]);
  return _mm512_mask_blend_ps(_mm512_test_epi32_mask(ix, _mm512_set1_epi32(32)), lo, hi);
}

// TT tiles of 16 rows times NB input rows: res[t][n][l] = sum_j tv_t[j][l] * x_n[col(j, l)].
//   tv, ti: the first tile's [width, 16] values and indices (width = n_banks * k); tile t
//      starts tile_stride elements after tile t - 1.
//   x: NB rows of in floats, row stride ldx. Columns >= in read as zero (masked loads), so
//      the window of the last bank never reads past the row.
// Several tiles in lockstep share the bank's x registers and keep 2 * TT weight streams in
// flight, which a single thread needs to pull its share of the memory bandwidth.
// Partial sums over blocks of about kSumBlock entries keep long rows' rounding error near
// that of a blocked GEMM (see tile_rows).
template <typename V, int NREG, int NB, int TT>
inline void tile_permute(const V* tv, const uint8_t* ti, int64_t tile_stride, int64_t n_banks,
                         int64_t k, int64_t bank_size, const float* x, int64_t ldx, int64_t in,
                         __m512 (&res)[TT][NB]) {
  const int64_t banks_per_block = std::max<int64_t>(1, kSumBlock / k);
#pragma GCC unroll 8
  for (int t = 0; t < TT; ++t) {
#pragma GCC unroll 8
    for (int n = 0; n < NB; ++n) res[t][n] = _mm512_setzero_ps();
  }
  for (int64_t b0 = 0; b0 < n_banks; b0 += banks_per_block) {
    const int64_t b1 = std::min(n_banks, b0 + banks_per_block);
    __m512 blk[TT][NB];
#pragma GCC unroll 8
    for (int t = 0; t < TT; ++t) {
#pragma GCC unroll 8
      for (int n = 0; n < NB; ++n) blk[t][n] = _mm512_setzero_ps();
    }
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t col = b * bank_size;
      __m512 xr[NB][NREG];
#pragma GCC unroll 4
      for (int r = 0; r < NREG; ++r) {
        const __mmask16 m = prefix_mask(in - col - 16 * r);
#pragma GCC unroll 8
        for (int n = 0; n < NB; ++n) xr[n][r] = _mm512_maskz_loadu_ps(m, x + n * ldx + col + 16 * r);
      }
      const int64_t e0 = b * k * kTileRows;  // the bank's first entry in each tile
      // software prefetch, a distance ahead in every stream (the hardware prefetchers stop
      // at each 4 KiB page): the indices' lines of this bank once, the values' in the loop
#pragma GCC unroll 4
      for (int t = 0; t < TT; ++t) {
        _mm_prefetch(reinterpret_cast<const char*>(ti + t * tile_stride + e0) +
                         kTilePrefetchBytes / static_cast<int64_t>(sizeof(V)),
                     _MM_HINT_T0);
      }
      for (int64_t s = 0; s < k; ++s) {
        const int64_t e = e0 + s * kTileRows;
        if ((s & 3) == 3) {  // banks with k > 4 entries span more than one line of indices
#pragma GCC unroll 4
          for (int t = 0; t < TT; ++t) {
            _mm_prefetch(reinterpret_cast<const char*>(ti + t * tile_stride + e) +
                             kTilePrefetchBytes / static_cast<int64_t>(sizeof(V)),
                         _MM_HINT_T0);
          }
        }
#pragma GCC unroll 4
        for (int t = 0; t < TT; ++t) {
          const V* v = tv + t * tile_stride + e;
          const uint8_t* id = ti + t * tile_stride + e;
          _mm_prefetch(reinterpret_cast<const char*>(v) + kTilePrefetchBytes, _MM_HINT_T0);
          const __m512i ix =
              _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(id)));
          const __m512 w = load16(v);
#pragma GCC unroll 8
          for (int n = 0; n < NB; ++n) {
            blk[t][n] = _mm512_fmadd_ps(w, lookup<NREG>(xr[n], ix), blk[t][n]);
          }
        }
      }
    }
#pragma GCC unroll 8
    for (int t = 0; t < TT; ++t) {
#pragma GCC unroll 8
      for (int n = 0; n < NB; ++n) res[t][n] = _mm512_add_ps(res[t][n], blk[t][n]);
    }
  }
}
#else
constexpr bool kTiledVectorised = false;
#endif

// Portable path (no AVX-512): the same sums, one lane at a time.
template <typename V>
inline float tile_lane_dot(const V* tv, const uint8_t* ti, int64_t width, int64_t k,
                           int64_t bank_size, const float* x, int64_t in, int64_t lane) {
  float acc = 0.f;
  for (int64_t jb = 0; jb < width; jb += kSumBlock) {
    const int64_t je = std::min(width, jb + kSumBlock);
    float blk = 0.f;
    for (int64_t j = jb; j < je; ++j) {
      const int64_t c = j / k * bank_size + ti[j * kTileRows + lane];
      if (c < in) blk += to_float(tv[j * kTileRows + lane]) * x[c];
    }
    acc += blk;
  }
  return acc;
}

}  // namespace bs_lightning::cpu
