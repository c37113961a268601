// CPU backward products of bs_lightning::balanced_linear_tiled on its tile layout (schemas in
// csrc/ops.cpp; tile layout in docs/ARCHITECTURE.md section 3), fp32:
//
//   balanced_linear_tiled_grad_input(grad [M, out], values [T, width, 16], indices, bank, in)
//     -> dx [M, in]             dx[m, c] = sum over the entries at column c of grad[m, o] * v
//   balanced_linear_tiled_grad_values(grad [M, out], x [M, in], indices [T, width, 16], bank,
//                                     in) -> dvalues [T, width, 16] (zero past out)
//
// Both cost M * nnz multiply-adds and read the tiles as the forward kernel does, so the
// backward of a tiled product needs no unpacking or repacking.
//
// grad_values is the forward kernel transposed: lane l of entry j of a tile is row
// o = 16 t + l, so over the input rows m, dv[t][j] (16 lanes) += grad[m, o0:o0+16] *
// x[m, bank slice][ti[t][j]], the bank's slice of x[m] held in registers and the lookup an
// in-register permute (lanes16.h). Rows are taken in chunks that keep grad's and x's
// slices in L2 while every tile passes over them.
//
// grad_input scatters: in chunks of C input rows and bank by bank, each thread owns a slab
// dx^T [bank_size, C] (in L1) and adds v * grad^T[o] (C lanes) to the slab row of every
// entry of the bank; the slab is then stored transposed into dx.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "balanced_linear.h"
#include "cpu/lanes16.h"
#include "cpu/tiled_kernels.h"

namespace bs_lightning::cpu {
namespace {

constexpr int64_t kRowBlock = 64;   // input rows per L2 block of grad_values
#if defined(__AVX512F__)
constexpr int64_t kMaxChunk = 128;  // slab row of grad_input: 8 zmm of grad^T in registers
#else
constexpr int64_t kMaxChunk = 64;   // AVX2: 8 ymm
#endif

// grad [M, out] fp32 and tiles [T, width, 16]; returns k.
int64_t check_tiled_backward(const char* op, const at::Tensor& grad, const at::Tensor& tiles,
                             int64_t bank_size, int64_t in_features) {
  TORCH_CHECK_TYPE(grad.scalar_type() == at::kFloat, op, ": grad must be torch.float32, got ",
                   dtype_name(grad.scalar_type()));
  TORCH_CHECK_VALUE(grad.dim() == 2, op, ": grad must be [M, out], got ", grad.sizes());
  check_bank_size(op, bank_size, kMaxTiledBank, "the tile kernel holds a bank of x in registers");
  TORCH_CHECK_VALUE(in_features >= 1, op, ": in_features must be >= 1, got ", in_features);
  TORCH_CHECK_VALUE(tiles.dim() == 3 && tiles.size(2) == kTileRows &&
                        tiles.size(0) == ceil_div(grad.size(1), kTileRows),
                    op, ": tiles must be [ceil(out / 16) = ", ceil_div(grad.size(1), kTileRows),
                    ", width, 16], got ", tiles.sizes());
  return check_width(op, tiles.size(1), bank_size, in_features);
}

#if defined(BS_LIGHTNING_LANES16)
// One chunk of C input rows, bank by bank: the bank's slab [bank_size, C] (L1) gets
// v * gt[o] (C lanes, held in registers for the row's k entries) at the row of every entry
// of the bank, then goes transposed into dx.
template <int64_t C>
void grad_input_chunk(const float* __restrict__ gt, int64_t ld, const float* tv,
                      const uint8_t* ti, int64_t out, int64_t width, int64_t k,
                      int64_t bank_size, int64_t in, int64_t n_tiles, int64_t m0, int64_t n,
                      float* __restrict__ slab, float* dx) {
  constexpr int Q = static_cast<int>(C / kTileRows);  // F16 vectors per slab row
  const int64_t stride = width * kTileRows, n_banks = width / k;
  for (int64_t b = 0; b < n_banks; ++b) {
    std::fill(slab, slab + bank_size * C, 0.f);
    for (int64_t t = 0; t < n_tiles; ++t) {
      const int64_t valid = std::min(kTileRows, out - t * kTileRows);
      for (int64_t l = 0; l < valid; ++l) {
        const float* g = gt + (t * kTileRows + l) * ld;
        F16 gv[Q];
#pragma GCC unroll 8
        for (int q = 0; q < Q; ++q) gv[q] = values16(g + q * kTileRows);
        const int64_t e0 = t * stride + b * k * kTileRows + l;
        for (int64_t s = 0; s < k; ++s) {
          const F16 w = broadcast16(tv[e0 + s * kTileRows]);
          // an index past the bank (never loaded: check_indices) stays inside the slab
          const int64_t r = std::min<int64_t>(ti[e0 + s * kTileRows], bank_size - 1);
          float* dst = slab + r * C;
#pragma GCC unroll 8
          for (int q = 0; q < Q; ++q) {
            store16(dst + q * kTileRows, fmadd16(w, gv[q], values16(dst + q * kTileRows)));
          }
        }
      }
    }
    const int64_t col = b * bank_size, cols = std::min(bank_size, in - col);
    for (int64_t i = 0; i < n; ++i) {
      float* row = dx + (m0 + i) * in + col;
      for (int64_t c = 0; c < cols; ++c) row[c] = slab[c * C + i];
    }
  }
}

// dx [M, in] in chunks of C input rows (C = 16 to kMaxChunk by M), chunks split across
// threads. Each chunk first transposes its rows of grad into gt [out, C] (zero past M), in
// blocks of 16 output rows that stay in L1 (ATen's strided copy of all of grad^T was half
// the op's time).
template <int64_t C>
void grad_input_tiles(const float* gp, const float* tv, const uint8_t* ti, int64_t M,
                      int64_t out, int64_t in, int64_t n_tiles, int64_t width, int64_t k,
                      int64_t bank_size, float* dxp) {
  at::parallel_for(0, ceil_div(M, C), 1, [&](int64_t c0, int64_t c1) {
    std::vector<float> slab(static_cast<size_t>(bank_size * C));
    std::vector<float> gt(static_cast<size_t>(out * C));
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t m0 = c * C, n = std::min(C, M - m0);
      for (int64_t o0 = 0; o0 < out; o0 += kTileRows) {
        const int64_t o1 = std::min(out, o0 + kTileRows);
        for (int64_t i = 0; i < C; ++i) {
          const float* src = gp + (m0 + i) * out;
          for (int64_t o = o0; o < o1; ++o) gt[o * C + i] = i < n ? src[o] : 0.f;
        }
      }
      grad_input_chunk<C>(gt.data(), C, tv, ti, out, width, k, bank_size, in, n_tiles, m0, n,
                          slab.data(), dxp);
    }
  });
}

// Rows [m0, m1) of TT tiles from t against NE entries from s0 of bank b:
// dv[u][e] += grad[m, rows of tile u] * x[m, bank][ix[u][e]]. The bank's x slice is loaded
// once per row for all TT tiles.
template <int NREG, int TT, int NE>
void tiles_bank_grad(const float* g, int64_t out, const float* x, int64_t in, int64_t m0,
                     int64_t m1, int64_t t, const uint8_t* ti, float* dv, int64_t stride,
                     int64_t b, int64_t s0, int64_t k, int64_t bank_size) {
  const int64_t col = b * bank_size;
  I16 ix[TT][NE];
  F16 acc[TT][NE];
#pragma GCC unroll 4
  for (int u = 0; u < TT; ++u) {
#pragma GCC unroll 8
    for (int e = 0; e < NE; ++e) {
      const int64_t entry = (t + u) * stride + (b * k + s0 + e) * kTileRows;
      ix[u][e] = indices16(ti + entry);
      acc[u][e] = load_prefix16(dv + entry, kTileRows);
    }
  }
  const bool full = col + 16 * NREG <= in;  // every bank but a short last one
  int64_t valid[TT];
#pragma GCC unroll 4
  for (int u = 0; u < TT; ++u) valid[u] = std::min(kTileRows, out - (t + u) * kTileRows);
  for (int64_t m = m0; m < m1; ++m) {
    F16 xr[NREG];
    if (full) {
#pragma GCC unroll 4
      for (int r = 0; r < NREG; ++r) xr[r] = values16(x + m * in + col + 16 * r);
    } else {
#pragma GCC unroll 4
      for (int r = 0; r < NREG; ++r) {
        xr[r] = load_prefix16(x + m * in + col + 16 * r, in - col - 16 * r);
      }
    }
#pragma GCC unroll 4
    for (int u = 0; u < TT; ++u) {
      const F16 gm = load_prefix16(g + m * out + (t + u) * kTileRows, valid[u]);
#pragma GCC unroll 8
      for (int e = 0; e < NE; ++e) acc[u][e] = fmadd16(gm, lookup16<NREG>(xr, ix[u][e]), acc[u][e]);
    }
  }
#pragma GCC unroll 4
  for (int u = 0; u < TT; ++u) {
#pragma GCC unroll 8
    for (int e = 0; e < NE; ++e) {
      store16(dv + (t + u) * stride + (b * k + s0 + e) * kTileRows, acc[u][e]);
    }
  }
}

// tiles_bank_grad with NE = ne (1..8) chosen at run time.
template <int NREG, int TT, int NE = 8>
void tiles_bank_grad_n(int ne, const float* g, int64_t out, const float* x, int64_t in,
                       int64_t m0, int64_t m1, int64_t t, const uint8_t* ti, float* dv,
                       int64_t stride, int64_t b, int64_t s0, int64_t k, int64_t bank_size) {
  if constexpr (NE > 0) {
    if (ne == NE) {
      return tiles_bank_grad<NREG, TT, NE>(g, out, x, in, m0, m1, t, ti, dv, stride, b, s0, k,
                                           bank_size);
    }
    tiles_bank_grad_n<NREG, TT, NE - 1>(ne, g, out, x, in, m0, m1, t, ti, dv, stride, b, s0, k,
                                        bank_size);
  }
}

// Tiles [t0, t1) against all banks, TT tiles at a time (the rest one by one), the entries of
// a bank in groups of at most 8 / TT accumulators per tile.
template <int NREG, int TT>
void tile_group_grad(const float* g, int64_t out, const float* x, int64_t in, int64_t m0,
                     int64_t m1, int64_t t0, int64_t t1, const uint8_t* ti, float* dv,
                     int64_t stride, int64_t n_banks, int64_t k, int64_t bank_size) {
  constexpr int group = 8 / TT;
  int64_t t = t0;
  for (; t + TT <= t1; t += TT) {
    for (int64_t b = 0; b < n_banks; ++b) {
      for (int64_t s0 = 0; s0 < k; s0 += group) {
        const int ne = static_cast<int>(std::min<int64_t>(group, k - s0));
        tiles_bank_grad_n<NREG, TT, group>(ne, g, out, x, in, m0, m1, t, ti, dv, stride, b, s0,
                                           k, bank_size);
      }
    }
  }
  if constexpr (TT > 1) {
    tile_group_grad<NREG, 1>(g, out, x, in, m0, m1, t, t1, ti, dv, stride, n_banks, k,
                             bank_size);
  }
}

template <int NREG>
void grad_values_tiles(const float* g, const float* x, const uint8_t* ti, int64_t M, int64_t out,
                       int64_t in, int64_t n_tiles, int64_t width, int64_t k, int64_t bank_size,
                       float* dv) {
  const int64_t stride = width * kTileRows, n_banks = width / k;
  at::parallel_for(0, n_tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t m0 = 0; m0 < M; m0 += kRowBlock) {
      const int64_t m1 = std::min(M, m0 + kRowBlock);
      // tiles in lockstep share the x loads: as many as keep <= 8 accumulators
      if (k <= 2) {
        tile_group_grad<NREG, 4>(g, out, x, in, m0, m1, t0, t1, ti, dv, stride, n_banks, k,
                                 bank_size);
      } else if (k <= 4) {
        tile_group_grad<NREG, 2>(g, out, x, in, m0, m1, t0, t1, ti, dv, stride, n_banks, k,
                                 bank_size);
      } else {
        tile_group_grad<NREG, 1>(g, out, x, in, m0, m1, t0, t1, ti, dv, stride, n_banks, k,
                                 bank_size);
      }
    }
  });
}
#endif

}  // namespace

at::Tensor balanced_linear_tiled_grad_input_cpu(const at::Tensor& grad, const at::Tensor& values,
                                                const at::Tensor& indices, int64_t bank_size,
                                                int64_t in_features) {
  constexpr const char* op = "balanced_linear_tiled_grad_input";
  const int64_t k = check_tiled_backward(op, grad, values, bank_size, in_features);
  TORCH_CHECK_TYPE(values.scalar_type() == at::kFloat && indices.scalar_type() == at::kByte, op,
                   ": values must be torch.float32 and indices torch.uint8");
  check_same_shape(op, values, indices);
#if defined(BS_LIGHTNING_LANES16)
  const int64_t M = grad.size(0), out = grad.size(1), n_tiles = values.size(0);
  at::Tensor dx = at::empty({M, in_features}, grad.options());
  const at::Tensor v = values.contiguous(), idx = indices.contiguous();
  const at::Tensor g = grad.contiguous();
  const auto run = [&](auto chunk) {
    grad_input_tiles<decltype(chunk)::value>(
        g.const_data_ptr<float>(), v.const_data_ptr<float>(), idx.const_data_ptr<uint8_t>(), M,
        out, in_features, n_tiles, values.size(1), k, bank_size, dx.mutable_data_ptr<float>());
  };
  // rows of the slab: more per entry amortise its index and address work
  if (M <= 16) {
    run(std::integral_constant<int64_t, 16>{});
  } else if (M <= 32) {
    run(std::integral_constant<int64_t, 32>{});
  } else if (M <= 64 || kMaxChunk == 64) {
    run(std::integral_constant<int64_t, 64>{});
  } else {
    run(std::integral_constant<int64_t, kMaxChunk>{});
  }
  return dx;
#else
  TORCH_CHECK(false, op, ": needs a build with AVX2 or AVX-512 (this one is ", kLanesIsa, ")");
#endif
}

at::Tensor balanced_linear_tiled_grad_values_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                 const at::Tensor& indices, int64_t bank_size,
                                                 int64_t in_features) {
  constexpr const char* op = "balanced_linear_tiled_grad_values";
  const int64_t k = check_tiled_backward(op, grad, indices, bank_size, in_features);
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat && indices.scalar_type() == at::kByte, op,
                   ": x must be torch.float32 and indices torch.uint8");
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(0) == grad.size(0) && x.size(1) == in_features, op,
                    ": x must be [M = ", grad.size(0), ", in_features = ", in_features, "], got ",
                    x.sizes());
#if defined(BS_LIGHTNING_LANES16)
  const int64_t M = grad.size(0), out = grad.size(1);
  const int64_t n_tiles = indices.size(0), width = indices.size(1);
  at::Tensor dv = at::zeros(indices.sizes(), grad.options());
  const at::Tensor g = grad.contiguous(), xc = x.contiguous(), idx = indices.contiguous();
  const auto run = [&](auto nreg) {
    grad_values_tiles<decltype(nreg)::value>(
        g.const_data_ptr<float>(), xc.const_data_ptr<float>(), idx.const_data_ptr<uint8_t>(), M,
        out, in_features, n_tiles, width, k, bank_size, dv.mutable_data_ptr<float>());
  };
  if (bank_size <= 16) {
    run(std::integral_constant<int, 1>{});
  } else if (bank_size <= 32) {
    run(std::integral_constant<int, 2>{});
  } else {
    run(std::integral_constant<int, 4>{});
  }
  return dv;
#else
  TORCH_CHECK(false, op, ": needs a build with AVX2 or AVX-512 (this one is ", kLanesIsa, ")");
#endif
}

}  // namespace bs_lightning::cpu

TORCH_LIBRARY_IMPL(bs_lightning, CPU, m) {
  m.impl("balanced_linear_tiled_grad_input", &bs_lightning::cpu::balanced_linear_tiled_grad_input_cpu);
  m.impl("balanced_linear_tiled_grad_values",
         &bs_lightning::cpu::balanced_linear_tiled_grad_values_cpu);
}
