// CPU implementation of bs_lightning::balanced_linear (schema in csrc/ops.cpp).
//
// Dispatch on the number of input rows M (all leading dims flattened):
//   M == 1          gather kernel (row_dot): vector loads of values and uint8 indices,
//                   a gather of x, FMA; rows split across threads.
//   2 <= M < dense  transposed-tile kernel (tile_rows): x^T per tile of 8..64 batch columns,
//                   each nonzero one broadcast * contiguous FMA over the tile.
//   M >= dense      blocks of rows unpacked to a dense tile + GEMM, where the dense GEMM is
//                   faster (crossover measured by `python -m bs_lightning.bench kernels`).
// dtypes: float32, bfloat16 and float16 run the kernels (accumulating in fp32); other
// floating dtypes (float64) take the dense path.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "balanced_linear.h"
#include "cpu/kernels.h"

namespace bs_lightning::cpu {
namespace {

// Smallest batch at which blocked unpack + dense GEMM beats the sparse tile kernel, by kept
// fraction d = k / bank_size. Measured (4096x4096, fp32, one thread's CPU time, AVX-512
// Xeon): tile kernel / dense time at d = 0.5: 0.77x (batch 64), 1.1x (256), 1.37x (1024);
// at d = 0.25: 0.63x (256), 0.74x (1024), 0.93x (4096). The tile kernel's cost grows with
// d * batch, the GEMM's with batch, so the crossover falls as d rises.
int64_t dense_crossover(int64_t k, int64_t bank_size) {
  const double d = static_cast<double>(k) / static_cast<double>(bank_size);
  if (d > 0.45) return 160;
  if (d > 0.37) return 512;
  if (d > 0.25) return 1024;
  return 8192;
}

// bank_start[j] = (j / k) * bank_size: first column of entry j's bank (same for all rows).
std::vector<int32_t> bank_starts(int64_t width, int64_t k, int64_t bank_size) {
  std::vector<int32_t> start(width);
  for (int64_t j = 0; j < width; ++j) start[j] = static_cast<int32_t>(j / k * bank_size);
  return start;
}

template <typename V>
void run_gemv(const at::Tensor& x2, const at::Tensor& values, const at::Tensor& indices,
              const std::vector<int32_t>& start, const float* bias, at::Tensor& out) {
  const int64_t in = x2.size(1), out_features = values.size(0), width = values.size(1);
  at::Tensor xp = at::zeros({in + kIndexPad}, x2.options().dtype(at::kFloat));
  xp.narrow(0, 0, in).copy_(x2.select(0, 0));
  const float* xptr = xp.const_data_ptr<float>();
  const V* vptr = values.const_data_ptr<V>();
  const uint8_t* iptr = indices.const_data_ptr<uint8_t>();
  V* optr = out.mutable_data_ptr<V>();
  at::parallel_for(0, out_features, 64, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const float s = row_dot(vptr + o * width, iptr + o * width, start.data(), xptr, width);
      optr[o] = static_cast<V>(bias ? s + bias[o] : s);
    }
  });
}

// Entries of a row are processed in chunks of whole banks whose slice of x^T (chunk columns
// x tile width, fp32) fits in about this many bytes of L2; wide layers (4096 x 25088)
// otherwise miss the cache on every entry.
constexpr int64_t kChunkBytes = int64_t{1} << 20;

template <typename V, int L, int NV, int R>
void run_tiles(const at::Tensor& x2, const at::Tensor& values, const at::Tensor& indices,
               const std::vector<int32_t>& start, int64_t k, int64_t bank_size, const float* bias,
               at::Tensor& out) {
  constexpr int64_t TB = int64_t{L} * NV;
  const int64_t M = x2.size(0), in = x2.size(1);
  const int64_t out_features = values.size(0), width = values.size(1);
  const int64_t n_tiles = ceil_div(M, TB), full = M / TB, rem = M % TB;
  const int64_t chunk = std::max<int64_t>(1, kChunkBytes / (bank_size * TB * 4)) * k;
  // xt[t, c, l] = x[t * TB + l, c]; zero in the padding rows and unused lanes.
  at::Tensor xt = at::zeros({n_tiles, in + kIndexPad, TB}, x2.options().dtype(at::kFloat));
  if (full > 0) {
    xt.narrow(0, 0, full).narrow(1, 0, in).copy_(
        x2.narrow(0, 0, full * TB).reshape({full, TB, in}).transpose(1, 2));
  }
  if (rem > 0) {
    xt.select(0, full).narrow(0, 0, in).narrow(1, 0, rem).copy_(x2.narrow(0, full * TB, rem).t());
  }
  // Partial sums accumulate in fp32: the output itself for fp32, else a buffer.
  at::Tensor acc = out.scalar_type() == at::kFloat
                       ? out
                       : at::empty({M, out_features}, out.options().dtype(at::kFloat));
  const float* xtptr = xt.const_data_ptr<float>();
  const V* vptr = values.const_data_ptr<V>();
  const uint8_t* iptr = indices.const_data_ptr<uint8_t>();
  float* aptr = acc.mutable_data_ptr<float>();
  const int64_t tile_stride = (in + kIndexPad) * TB;
  at::parallel_for(0, ceil_div(out_features, R), 8, [&](int64_t gbegin, int64_t gend) {
    const int64_t begin = gbegin * R, end = std::min(gend * R, out_features);
    // One tile's chunk of x^T stays in cache while this thread's rows stream past it.
    for (int64_t t = 0; t < n_tiles; ++t) {
      const float* tile = xtptr + t * tile_stride;
      const int64_t nb = std::min(TB, M - t * TB);
      for (int64_t j0 = 0; j0 < width; j0 += chunk) {
        const int64_t j1 = std::min(width, j0 + chunk);
        int64_t o = begin;
        for (; o + R <= end; o += R) {
          tile_rows<V, L, NV, R>(vptr, iptr, start.data(), width, j0, j1, tile, o, bias, aptr,
                                 out_features, t * TB, nb);
        }
        for (; o < end; ++o) {
          tile_rows<V, L, NV, 1>(vptr, iptr, start.data(), width, j0, j1, tile, o, bias, aptr,
                                 out_features, t * TB, nb);
        }
      }
    }
  });
  if (!acc.is_same(out)) out.copy_(acc);
}

// Large batches: unpack block_rows rows at a time into a reused dense tile (it stays in
// cache; its pad columns absorb a bad index) and let the dense GEMM multiply it by x,
// writing straight into out's columns. Costs one weight-sized write in cache on top of
// the GEMM, instead of a full dense matrix in memory.
constexpr int64_t kDenseTileElems = int64_t{1} << 22;  // 16 MiB fp32 tile: GEMM-sized

template <typename V>
void run_dense_blocked(const at::Tensor& x2, const at::Tensor& values, const at::Tensor& indices,
                       const std::vector<int32_t>& start, const std::optional<at::Tensor>& bias,
                       at::Tensor& out) {
  const int64_t in = x2.size(1), out_features = values.size(0), width = values.size(1);
  // Enough rows per tile for an efficient GEMM (1024 rows of 4096 columns).
  const int64_t block = std::max<int64_t>(64, kDenseTileElems / (in + kIndexPad));
  const int64_t block_rows = std::min(block, out_features);
  at::Tensor tile = at::empty({block_rows, in + kIndexPad}, values.options());
  const V* vptr = values.const_data_ptr<V>();
  const uint8_t* iptr = indices.const_data_ptr<uint8_t>();
  V* tptr = tile.mutable_data_ptr<V>();
  for (int64_t o0 = 0; o0 < out_features; o0 += block_rows) {
    const int64_t rows = std::min(block_rows, out_features - o0);
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        V* row = tptr + r * (in + kIndexPad);
        std::fill(row, row + in + kIndexPad, V(0));
        const V* v = vptr + (o0 + r) * width;
        const uint8_t* id = iptr + (o0 + r) * width;
        for (int64_t j = 0; j < width; ++j) row[start[j] + id[j]] += v[j];  // sums duplicates
      }
    });
    const at::Tensor w = tile.narrow(0, 0, rows).narrow(1, 0, in);  // [rows, in]
    at::Tensor dst = out.narrow(1, o0, rows);                      // [M, rows]
    if (bias.has_value()) {
      at::addmm_out(dst, bias->narrow(0, o0, rows), x2, w.t());
    } else {
      at::mm_out(dst, x2, w.t());
    }
  }
}

template <typename V>
void run_sparse(const at::Tensor& x2, const at::Tensor& values, const at::Tensor& indices,
                const std::vector<int32_t>& start, int64_t k, int64_t bank_size, const float* bias,
                at::Tensor& out) {
  const int64_t M = x2.size(0);
  if (M == 1) {
    run_gemv<V>(x2, values, indices, start, bias, out);
  } else if (M <= 8) {
    run_tiles<V, 8, 1, 8>(x2, values, indices, start, k, bank_size, bias, out);
#if !defined(__AVX512F__)
    // Without AVX-512, 8-lane (ymm) vectors: GCC splits the 16-lane ones below into halves
    // and spills them (2-3x slower at 16-128 rows on an AVX2 EPYC).
  } else if (M <= 16) {
    run_tiles<V, 8, 2, 3>(x2, values, indices, start, k, bank_size, bias, out);
  } else {
    run_tiles<V, 8, 4, 3>(x2, values, indices, start, k, bank_size, bias, out);
  }
#else
  } else if (M <= 16) {
    run_tiles<V, 16, 1, 8>(x2, values, indices, start, k, bank_size, bias, out);
  } else if (M <= 32) {
    run_tiles<V, 16, 2, 4>(x2, values, indices, start, k, bank_size, bias, out);
  } else {
    run_tiles<V, 16, 4, 2>(x2, values, indices, start, k, bank_size, bias, out);
  }
#endif
}

}  // namespace

at::Tensor balanced_linear_cpu(const at::Tensor& x, const at::Tensor& values,
                               const at::Tensor& indices, int64_t bank_size, int64_t in_features,
                               const std::optional<at::Tensor>& bias) {
  const int64_t k =
      check_balanced_linear_inputs(x, values, indices, bank_size, in_features, bias);
  const auto dtype = x.scalar_type();
  const int64_t M = x.numel() / in_features, out_features = values.size(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = out_features;
  at::Tensor out = at::empty({M, out_features}, x.options());
  if (M == 0 || out_features == 0) return out.view(out_shape);
  const at::Tensor x2 = x.reshape({M, in_features});
  const at::Tensor v = values.contiguous();
  const at::Tensor idx = indices.contiguous();
  const std::vector<int32_t> start = bank_starts(v.size(1), k, bank_size);
  const bool has_kernel = dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf;
  if (!has_kernel || M >= dense_crossover(k, bank_size)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "balanced_linear_dense", [&] {
      run_dense_blocked<scalar_t>(x2, v, idx, start, bias, out);
    });
    return out.view(out_shape);
  }
  const at::Tensor bias_f = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* bptr = bias_f.defined() ? bias_f.const_data_ptr<float>() : nullptr;
  if (dtype == at::kFloat) {
    run_sparse<float>(x2, v, idx, start, k, bank_size, bptr, out);
  } else if (dtype == at::kBFloat16) {
    run_sparse<c10::BFloat16>(x2, v, idx, start, k, bank_size, bptr, out);
  } else {
    run_sparse<c10::Half>(x2, v, idx, start, k, bank_size, bptr, out);
  }
  return out.view(out_shape);
}

}  // namespace bs_lightning::cpu

TORCH_LIBRARY_IMPL(bs_lightning, CPU, m) {
  m.impl("balanced_linear", &bs_lightning::cpu::balanced_linear_cpu);
}
