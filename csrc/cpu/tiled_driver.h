// Drivers of the tile kernel (tiled_kernels.h): tiles split across threads, chunks of
// input rows, bias and the output store. Shared by the tiled product
// (balanced_linear_tiled_cpu.cpp) and the fused LSTM layer (lstm_layer_cpu.cpp).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/tiled_kernels.h"

namespace bs_lightning::cpu {

struct TiledArgs {
  const float* x;  // [M, in] fp32, contiguous
  int64_t M, in, out_features, n_tiles, width, k, bank_size;
  const float* bias;  // [out] fp32 or nullptr
};

#if defined(BS_LIGHTNING_LANES16)
// Tiles run in lockstep by one pass: as many as leave registers for x and the sums.
template <int NREG, int NB>
constexpr int tiles_per_pass() {
  return NB * NREG <= 4 ? 4 : (NB * NREG <= 8 ? 2 : 1);
}

// Input rows [m0, m0 + NB) against the TT tiles from tile t.
template <typename V, int NREG, int NB, int TT>
void tile_pass(const TiledArgs& a, const V* tv, const uint8_t* ti, int64_t t, int64_t m0,
               V* out) {
  const int64_t stride = a.width * kTileRows;
  F16 res[TT][NB];
  tile_permute<V, NREG, NB, TT>(tv + t * stride, ti + t * stride, stride, a.width / a.k, a.k,
                                a.bank_size, a.x + m0 * a.in, a.in, a.in, res);
#pragma GCC unroll 4
  for (int u = 0; u < TT; ++u) {
    const int64_t o0 = (t + u) * kTileRows, valid = std::min(kTileRows, a.out_features - o0);
    const F16 bias = a.bias ? load_prefix16(a.bias + o0, valid) : zero16();
#pragma GCC unroll 8
    for (int n = 0; n < NB; ++n) {
      store_row(out + (m0 + n) * a.out_features + o0, add16(res[u][n], bias), valid);
    }
  }
}

// Input rows [m0, m0 + NB) against tiles [g0, g1).
template <typename V, int NREG, int NB>
void group_pass(const TiledArgs& a, const V* tv, const uint8_t* ti, int64_t g0, int64_t g1,
                int64_t m0, V* out) {
  constexpr int TT = tiles_per_pass<NREG, NB>();
  int64_t t = g0;
  for (; t + TT <= g1; t += TT) tile_pass<V, NREG, NB, TT>(a, tv, ti, t, m0, out);
  for (; t < g1; ++t) tile_pass<V, NREG, NB, 1>(a, tv, ti, t, m0, out);
}

// group_pass with NB = nb (1 <= nb <= NB) chosen at run time.
template <typename V, int NREG, int NB>
void group_pass_rows(const TiledArgs& a, const V* tv, const uint8_t* ti, int64_t g0, int64_t g1,
                     int64_t m0, int64_t nb, V* out) {
  if constexpr (NB > 0) {
    if (nb == NB) return group_pass<V, NREG, NB>(a, tv, ti, g0, g1, m0, out);
    group_pass_rows<V, NREG, NB - 1>(a, tv, ti, g0, g1, m0, nb, out);
  }
}

// Bytes of compact weight per group of tiles that a thread keeps in its L2 while every
// chunk of x passes over the group: chunk-outer, tile-inner would stream all of x from L3
// once per tile, which made batch 256 four times slower than batch 64 per product.
constexpr int64_t kGroupBytes = int64_t{256} << 10;

template <typename V, int NREG>
void run_permute(const TiledArgs& a, const V* tv, const uint8_t* ti, V* out, int64_t grain) {
  // x rows per pass over a tile: NB * NREG registers of x must fit beside the sums
#if defined(__AVX512F__)
  constexpr int NB = NREG == 4 ? 4 : 8;
#else
  // AVX2: an F16 is two of the 16 ymm registers; fewer rows per pass (measured on Zen 3)
  constexpr int NB = NREG == 4 ? 1 : 2;
#endif
  const int64_t tile_bytes = a.width * kTileRows * static_cast<int64_t>(sizeof(V) + 1);
  const int64_t group = std::max<int64_t>(4, kGroupBytes / tile_bytes);
  at::parallel_for(0, a.n_tiles, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t g0 = t0; g0 < t1; g0 += group) {
      const int64_t g1 = std::min(t1, g0 + group);
      for (int64_t m0 = 0; m0 < a.M; m0 += NB) {
        group_pass_rows<V, NREG, NB>(a, tv, ti, g0, g1, m0, std::min<int64_t>(NB, a.M - m0), out);
      }
    }
  });
}
#endif

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
// Input rows from which run_broadcast beats run_permute (AVX2 builds).
constexpr int64_t kBroadcastMinRows = 4;  // measured on Zen 3: M = 2 is faster with permute

// AVX2, M >= kBroadcastMinRows: x^T of every 8 input rows, then groups of tiles (as in
// run_permute) against each 8-row chunk, half a tile at a time (half_tile_broadcast).
template <typename V>
void run_broadcast(const TiledArgs& a, const V* tv, const uint8_t* ti, V* out, int64_t grain) {
  const int64_t n_chunks = (a.M + 7) / 8, rows = a.in + kIndexPad;
  // xt[c, i, n] = x[c * 8 + n, i]; zero past in and past M
  std::vector<float> xt(static_cast<size_t>(n_chunks * rows * 8), 0.f);
  for (int64_t m = 0; m < a.M; ++m) {
    float* dst = xt.data() + (m / 8) * rows * 8 + m % 8;
    for (int64_t i = 0; i < a.in; ++i) dst[i * 8] = a.x[m * a.in + i];
  }
  const int64_t stride = a.width * kTileRows, n_banks = a.width / a.k;
  const int64_t tile_bytes = stride * static_cast<int64_t>(sizeof(V) + 1);
  const int64_t group = std::max<int64_t>(4, kGroupBytes / tile_bytes);
  at::parallel_for(0, a.n_tiles, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t g0 = t0; g0 < t1; g0 += group) {
      const int64_t g1 = std::min(t1, g0 + group);
      for (int64_t c = 0; c < n_chunks; ++c) {
        const int64_t nb = std::min<int64_t>(8, a.M - c * 8);
        for (int64_t t = g0; t < g1; ++t) {
          for (int64_t h = 0; h < 2; ++h) {
            const int64_t o0 = t * kTileRows + h * 8;
            const int64_t valid = std::min<int64_t>(8, a.out_features - o0);
            if (valid <= 0) break;
            __m256 res[8];
            half_tile_broadcast(tv + t * stride + h * 8, ti + t * stride + h * 8, n_banks, a.k,
                                a.bank_size, xt.data() + c * rows * 8, res);
            alignas(32) float r[8][8];  // [row l][input n]
#pragma GCC unroll 8
            for (int l = 0; l < 8; ++l) _mm256_store_ps(r[l], res[l]);
            for (int64_t n = 0; n < nb; ++n) {
              V* dst = out + (c * 8 + n) * a.out_features + o0;
              for (int64_t l = 0; l < valid; ++l) {
                dst[l] = static_cast<V>(a.bias ? r[l][n] + a.bias[o0 + l] : r[l][n]);
              }
            }
          }
        }
      }
    }
  });
}
#endif

template <typename V>
void run_portable(const TiledArgs& a, const V* tv, const uint8_t* ti, V* out, int64_t grain) {
  const int64_t tile_elems = a.width * kTileRows;
  at::parallel_for(0, a.n_tiles, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t o0 = t * kTileRows, valid = std::min(kTileRows, a.out_features - o0);
      for (int64_t m = 0; m < a.M; ++m) {
        for (int64_t l = 0; l < valid; ++l) {
          const float s = tile_lane_dot(tv + t * tile_elems, ti + t * tile_elems, a.width, a.k,
                                        a.bank_size, a.x + m * a.in, a.in, l);
          out[m * a.out_features + o0 + l] = static_cast<V>(a.bias ? s + a.bias[o0 + l] : s);
        }
      }
    }
  });
}


// out [M, out_features] = x [M, in] times the tiled matrix (+ bias), fp32 accumulation.
// grain: fewest tiles per thread (small products run on the calling thread alone).
template <typename V>
void run_tiled(const TiledArgs& a, const V* tv, const uint8_t* ti, V* out, int64_t grain = 4) {
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
  if (a.M >= kBroadcastMinRows) return run_broadcast<V>(a, tv, ti, out, grain);
#endif
#if defined(BS_LIGHTNING_LANES16)
  if (a.bank_size <= 16) return run_permute<V, 1>(a, tv, ti, out, grain);
  if (a.bank_size <= 32) return run_permute<V, 2>(a, tv, ti, out, grain);
  return run_permute<V, 4>(a, tv, ti, out, grain);
#else
  run_portable<V>(a, tv, ti, out, grain);
#endif
}


}  // namespace bs_lightning::cpu
