// CPU implementation of bs_lightning::balanced_linear_tiled (schema in csrc/ops.cpp): the
// balanced product on the CPU tile layout made by bs_lightning.ops.pack_tiles.
//
//   values  [n_tiles, width, 16] (x.dtype), indices [n_tiles, width, 16] uint8,
//   width = n_banks * k, n_tiles = ceil(out_features / 16); row t * 16 + l of the compact
//   matrix is lane l of tile t (rows past out_features are zero padding).
//
// Dispatch on the number of input rows M (leading dims flattened):
//   M < dense crossover  permute kernel (tile_permute), up to 8 input rows per pass over
//                        a tile, tiles split across threads;
//   M >= crossover       tiles unpacked block by block into a dense matrix + GEMM.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include "balanced_linear.h"
#include "cpu/tiled_driver.h"

namespace bs_lightning::cpu {
namespace {

int64_t check_tiled_inputs(const at::Tensor& x, const at::Tensor& values,
                           const at::Tensor& indices, int64_t bank_size, int64_t in_features,
                           int64_t out_features, const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "balanced_linear_tiled";
  check_operand_dtypes(op, x, values, indices);
  check_bank_size(op, bank_size, kMaxTiledBank, "the tile kernel holds a bank of x in registers");
  TORCH_CHECK_VALUE(in_features >= 1 && out_features >= 1, op,
                    ": in_features and out_features must be >= 1, got ", in_features, " and ",
                    out_features);
  check_x(op, x, in_features);
  const int64_t n_tiles = ceil_div(out_features, kTileRows);
  TORCH_CHECK_VALUE(values.dim() == 3 && values.size(0) == n_tiles && values.size(2) == kTileRows,
                    op, ": values must have shape [ceil(out_features / 16) = ", n_tiles,
                    ", n_banks * k, 16], got ", values.sizes());
  check_same_shape(op, values, indices);
  const int64_t k = check_width(op, values.size(1), bank_size, in_features);
  check_devices_and_bias(op, x, values, indices, bias, "out_features", out_features);
  return k;
}

// Large M: unpack 16-row tiles block by block into a reused dense [rows, in + bank] matrix
// (the pad columns absorb an index past in_features) and multiply it with the GEMM.
template <typename V>
void run_dense(const at::Tensor& x2, const at::Tensor& values, const at::Tensor& indices,
               int64_t k, int64_t bank_size, int64_t out_features,
               const std::optional<at::Tensor>& bias, at::Tensor& out) {
  const int64_t in = x2.size(1), width = values.size(1), ld = in + bank_size;
  const int64_t tiles_per_block =
      std::max<int64_t>(4, (int64_t{1} << 22) / (ld * kTileRows));  // ~16 MiB fp32 block
  at::Tensor block = at::empty({tiles_per_block * kTileRows, ld}, values.options());
  const V* vptr = values.const_data_ptr<V>();
  const uint8_t* iptr = indices.const_data_ptr<uint8_t>();
  V* bptr = block.mutable_data_ptr<V>();
  for (int64_t t0 = 0; t0 < values.size(0); t0 += tiles_per_block) {
    const int64_t nt = std::min(tiles_per_block, values.size(0) - t0);
    const int64_t o0 = t0 * kTileRows, rows = std::min(nt * kTileRows, out_features - o0);
    at::parallel_for(0, nt, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        V* dst = bptr + t * kTileRows * ld;
        std::fill(dst, dst + kTileRows * ld, V(0));
        const V* v = vptr + (t0 + t) * width * kTileRows;
        const uint8_t* id = iptr + (t0 + t) * width * kTileRows;
        for (int64_t j = 0; j < width; ++j) {
          const int64_t start = j / k * bank_size;
          for (int64_t l = 0; l < kTileRows; ++l) {
            dst[l * ld + start + id[j * kTileRows + l]] += v[j * kTileRows + l];
          }
        }
      }
    });
    const at::Tensor w = block.narrow(0, 0, rows).narrow(1, 0, in);  // [rows, in]
    at::Tensor dst = out.narrow(1, o0, rows);                        // [M, rows]
    if (bias.has_value()) {
      at::addmm_out(dst, bias->narrow(0, o0, rows), x2, w.t());
    } else {
      at::mm_out(dst, x2, w.t());
    }
  }
}

// True on an AMD CPU (CPUID vendor "AuthenticAMD"): the crossover below depends on it.
bool amd_cpu() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool amd = [] {
    unsigned int eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid(0, &eax, &ebx, &ecx, &edx)) return false;
    char vendor[13] = {};
    std::memcpy(vendor, &ebx, 4);
    std::memcpy(vendor + 4, &edx, 4);
    std::memcpy(vendor + 8, &ecx, 4);
    return std::strcmp(vendor, "AuthenticAMD") == 0;
  }();
  return amd;
#else
  return false;
#endif
}

}  // namespace

// Smallest M at which unpack + GEMM beats the permute kernel, by kept fraction d = k / B.
// Measured with benchmarks/tiled_crossover.py (benchmarks/results/
// cpu-2core-2026-12-04-tiled-crossover-{avx512,avx2}.md; the Xeon's with `python -m
// bs_lightning.bench kernels`): the permute kernel's cost grows with d * M (one permute and
// one FMA per 16 products), the GEMM's with M alone. On the AVX-512 Xeon MKL's GEMM wins
// from 128 rows at d > 0.45 and from 512 at d > 0.3; on an AVX-512 AMD EPYC (Zen 4), where
// MKL runs slower, the kernel won at every d <= 0.75 and M <= 1024 measured (1.40x dense
// and up), so the rule never unpacks there; the AVX2 build on that EPYC is near parity at
// d = 0.5 and keeps the Xeon's rule. The modules measure the dense copy
// against this op per size class on top of it (nn/base.py).
int64_t tiled_dense_crossover(int64_t k, int64_t bank_size) {
  if (const int64_t v = min_batch_from_env(kCpuDenseMinBatchEnv); v > 0) return v;
  constexpr int64_t kNever = int64_t{1} << 62;
  if (std::strcmp(kLanesIsa, "avx512") == 0 && amd_cpu()) return kNever;
  const double d = static_cast<double>(k) / static_cast<double>(bank_size);
  if (d > 0.45) return 128;
  if (d > 0.3) return 512;
  return kNever;  // sparse wins at every batch measured
}

at::Tensor balanced_linear_tiled_cpu(const at::Tensor& x, const at::Tensor& values,
                                     const at::Tensor& indices, int64_t bank_size,
                                     int64_t in_features, int64_t out_features,
                                     const std::optional<at::Tensor>& bias) {
  const int64_t k = check_tiled_inputs(x, values, indices, bank_size, in_features,
                                       out_features, bias);
  const auto dtype = x.scalar_type();
  const int64_t M = x.numel() / in_features;
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = out_features;
  at::Tensor out = at::empty({M, out_features}, x.options());
  if (M == 0) return out.view(out_shape);
  const at::Tensor x2 = x.reshape({M, in_features});
  const at::Tensor v = values.contiguous();
  const at::Tensor idx = indices.contiguous();
  const bool has_kernel = dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf;
  if (!has_kernel || M >= tiled_dense_crossover(k, bank_size)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "balanced_linear_tiled_dense",
                                    [&] {
                                      run_dense<scalar_t>(x2, v, idx, k, bank_size, out_features,
                                                          bias, out);
                                    });
    return out.view(out_shape);
  }
  const at::Tensor xf = x2.to(at::kFloat).contiguous();
  const at::Tensor bias_f = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const TiledArgs a{xf.const_data_ptr<float>(),
                    M,
                    in_features,
                    out_features,
                    v.size(0),
                    v.size(1),
                    k,
                    bank_size,
                    bias_f.defined() ? bias_f.const_data_ptr<float>() : nullptr};
  const uint8_t* iptr = idx.const_data_ptr<uint8_t>();
  if (dtype == at::kFloat) {
    run_tiled<float>(a, v.const_data_ptr<float>(), iptr, out.mutable_data_ptr<float>());
  } else if (dtype == at::kBFloat16) {
    run_tiled<c10::BFloat16>(a, v.const_data_ptr<c10::BFloat16>(), iptr,
                             out.mutable_data_ptr<c10::BFloat16>());
  } else {
    run_tiled<c10::Half>(a, v.const_data_ptr<c10::Half>(), iptr, out.mutable_data_ptr<c10::Half>());
  }
  return out.view(out_shape);
}

std::string cpu_isa() { return kLanesIsa; }

}  // namespace bs_lightning::cpu

TORCH_LIBRARY_IMPL(bs_lightning, CPU, m) {
  m.impl("balanced_linear_tiled", &bs_lightning::cpu::balanced_linear_tiled_cpu);
}
