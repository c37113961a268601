// CPU inner loop of the tiled balanced product (docs/ARCHITECTURE.md section 3, "CPU tile
// layout"). Rows are grouped in tiles of 16; a tile stores, for every entry j of its rows,
// the 16 rows' values (one 64-byte line of fp32) and their 16 uint8 in-bank indices.
//
// All 16 rows of a tile read entry j from the same bank, so the bank's slice of x (up to 64
// floats) is held in 1, 2 or 4 16-lane vectors and each entry becomes an in-register
// permute (lanes16.h: vpermps / vpermi2ps with AVX-512, vpermps + blends with AVX2) instead
// of a 16-load gather: the loop is then bound by the bytes of the compact weight, not by
// instructions.
#pragma once

#include <algorithm>
#include <cstdint>

#include "cpu/lanes16.h"

namespace bs_lightning::cpu {

constexpr int64_t kTileRows = 16;      // rows per tile = the lanes of an F16 (lanes16.h)
constexpr int64_t kMaxTiledBank = 64;  // x slice of a bank in at most 4 F16 vectors
constexpr int64_t kTilePrefetchBytes = 4096;  // software prefetch distance (values stream)

#if defined(BS_LIGHTNING_LANES16)
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
                         F16 (&res)[TT][NB]) {
  const int64_t banks_per_block = std::max<int64_t>(1, kSumBlock / k);
#pragma GCC unroll 8
  for (int t = 0; t < TT; ++t) {
#pragma GCC unroll 8
    for (int n = 0; n < NB; ++n) res[t][n] = zero16();
  }
  for (int64_t b0 = 0; b0 < n_banks; b0 += banks_per_block) {
    const int64_t b1 = std::min(n_banks, b0 + banks_per_block);
    F16 blk[TT][NB];
#pragma GCC unroll 8
    for (int t = 0; t < TT; ++t) {
#pragma GCC unroll 8
      for (int n = 0; n < NB; ++n) blk[t][n] = zero16();
    }
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t col = b * bank_size;
      F16 xr[NB][NREG];
      if (col + 16 * NREG <= in) {  // every bank but a short last one: plain loads
#pragma GCC unroll 4
        for (int r = 0; r < NREG; ++r) {
#pragma GCC unroll 8
          for (int n = 0; n < NB; ++n) xr[n][r] = values16(x + n * ldx + col + 16 * r);
        }
      } else {
#pragma GCC unroll 4
        for (int r = 0; r < NREG; ++r) {
#pragma GCC unroll 8
          for (int n = 0; n < NB; ++n) {
            xr[n][r] = load_prefix16(x + n * ldx + col + 16 * r, in - col - 16 * r);
          }
        }
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
          _mm_prefetch(reinterpret_cast<const char*>(v) + kTilePrefetchBytes, _MM_HINT_T0);
          const I16 ix = indices16(ti + t * tile_stride + e);
          const F16 w = values16(v);
#pragma GCC unroll 8
          for (int n = 0; n < NB; ++n) {
            blk[t][n] = fmadd16(w, lookup16<NREG>(xr[n], ix), blk[t][n]);
          }
        }
      }
    }
#pragma GCC unroll 8
    for (int t = 0; t < TT; ++t) {
#pragma GCC unroll 8
      for (int n = 0; n < NB; ++n) res[t][n] = add16(res[t][n], blk[t][n]);
    }
  }
}
#endif

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
// Batched inputs with AVX2, where a bank of x does not fit a permute: 8 input rows at a
// time through x^T, so each nonzero is one broadcast value times one contiguous load of its
// column's 8 inputs (3 loads and an FMA per 8 products; the permute lookup costs 7 shuffles
// and blends per 8 products for a bank of 32 and is shuffle-port bound from 2 input rows on).
//   tv, ti: one tile's [width, 16] values and indices, from lane h * 8 (half h of the tile).
//   xt: [in + kIndexPad, 8] x^T of the 8 input rows, zero in unused lanes and past in (any
//      uint8 index stays inside it).
//   res[l] lane n: row l of the half tile times input row n.
template <typename V>
inline void half_tile_broadcast(const V* tv, const uint8_t* ti, int64_t n_banks, int64_t k,
                                int64_t bank_size, const float* xt, __m256 (&res)[8]) {
  const int64_t banks_per_block = std::max<int64_t>(1, kSumBlock / k);
#pragma GCC unroll 8
  for (int l = 0; l < 8; ++l) res[l] = _mm256_setzero_ps();
  for (int64_t b0 = 0; b0 < n_banks; b0 += banks_per_block) {
    const int64_t b1 = std::min(n_banks, b0 + banks_per_block);
    __m256 blk[8];
#pragma GCC unroll 8
    for (int l = 0; l < 8; ++l) blk[l] = _mm256_setzero_ps();
    for (int64_t b = b0; b < b1; ++b) {
      const float* xb = xt + b * bank_size * 8;
      for (int64_t e = b * k * kTileRows, e1 = e + k * kTileRows; e < e1; e += kTileRows) {
        _mm_prefetch(reinterpret_cast<const char*>(tv + e) + kTilePrefetchBytes, _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(ti + e) +
                         kTilePrefetchBytes / static_cast<int64_t>(sizeof(V)),
                     _MM_HINT_T0);
#pragma GCC unroll 8
        for (int l = 0; l < 8; ++l) {
          const __m256 xv = _mm256_loadu_ps(xb + int64_t{ti[e + l]} * 8);
          blk[l] = _mm256_fmadd_ps(_mm256_set1_ps(to_float(tv[e + l])), xv, blk[l]);
        }
      }
    }
#pragma GCC unroll 8
    for (int l = 0; l < 8; ++l) res[l] = _mm256_add_ps(res[l], blk[l]);
  }
}
#endif

// Portable path (neither AVX-512 nor AVX2): the same sums, one lane at a time.
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
