// CUDA implementation of bs_lightning::balanced_linear (schema in csrc/ops.cpp).
//
// Dispatch by the number of input rows N (all leading dimensions of x flattened):
// - N < cuda_dense_crossover (csrc/balanced_linear.h): the gather kernel (gather_kernel.cuh), SpMV for N = 1 and SpMM
//   for small N (x staged transposed, up to 8 batch columns per block, more via grid.y).
// - N >= cuda_dense_crossover (or x too long to stage in shared memory, or float64): unpack the
//   compact weight to a dense matrix (unpack_kernel.cuh) and call cuBLAS through at::linear.
//
// Crossover rule. The gather kernel does N * nnz multiply-adds on the CUDA cores at roughly
// kGatherMacPerByte multiply-adds per byte of DRAM bandwidth (ptxas/issue estimate: 8 FMA +
// 8 conversions + one 16-byte shared gather per entry and 8 batch columns, about 2-3 MAC per
// DRAM byte on an H100/H200); the dense path moves the unpacked weight twice (write + read,
// 2 * elem_bytes per weight) and then runs on tensor cores. Equal cost at
//   N * density * kGatherMacPerByte^-1 = 2 * elem_bytes  ->  N* = 2 * elem_bytes * 2 / density
// with kGatherMacPerByte = 2: N* = 85 for fp16 at 90.6% sparsity, 16 at 50%. The benchmark
// (`bs_lightning.bench kernels --device cuda`) measures the real crossover per shape; set
// BS_LIGHTNING_CUDA_DENSE_MIN_BATCH=<N> to override the rule (1 = always dense).
//
// Everything runs on torch's current stream, allocates through torch's caching allocator and
// never synchronises the host, so the op can be captured in a CUDA graph.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>

#include "balanced_linear.h"
#include "gather_launch.h"
#include "unpack_kernel.cuh"

namespace bs_lightning::cuda {
namespace {

template <typename T>
at::Tensor unpack_dense(const at::Tensor& values, const at::Tensor& indices, int64_t k,
                        int64_t bank_size, int64_t in_features) {
  const int64_t out = values.size(0);
  const int64_t n_banks = ceil_div(in_features, bank_size);
  at::Tensor dense = at::empty({out, in_features}, values.options());
  UnpackParams p;
  p.values = values.data_ptr();
  p.indices = indices.data_ptr<uint8_t>();
  p.dense = dense.data_ptr();
  p.out_features = static_cast<int>(out);
  p.in_features = static_cast<int>(in_features);
  p.row_len = static_cast<int>(values.size(1));
  p.k = static_cast<int>(k);
  p.bank_size = static_cast<int>(bank_size);
  p.k_magic = div_magic(static_cast<uint32_t>(k));
  p.tile_banks = static_cast<int>(std::max<int64_t>(1, kUnpackTileCols / bank_size));
  p.n_tiles = static_cast<int>(ceil_div(n_banks, p.tile_banks));
  const int64_t blocks = out * p.n_tiles;
  TORCH_CHECK(blocks <= INT32_MAX, "balanced_linear (CUDA): weight too large to unpack");
  const size_t smem = sizeof(float) * unpack_smem_floats(p.tile_banks, p.bank_size);
  balanced_unpack_kernel<T><<<static_cast<unsigned>(blocks), kUnpackThreads, smem,
                              at::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dense;
}

template <typename T>
at::Tensor run_typed(const at::Tensor& x2d, const at::Tensor& values, const at::Tensor& indices,
                     const std::optional<at::Tensor>& bias, int64_t k, int64_t bank_size,
                     int64_t in_features) {
  const int64_t n_batch = x2d.size(0);
  const int64_t out = values.size(0);
  const size_t limit = smem_optin();
  auto smem_for = [&](int b) { return gather_smem_bytes(in_features, bank_size, b, sizeof(T)); };
  int nb = n_batch == 1 ? 1 : n_batch == 2 ? 2 : n_batch <= 4 ? 4 : 8;
  while (nb > 1 && smem_for(nb) > limit) nb /= 2;
  const bool fits = smem_for(nb) <= limit;

  if (!fits || n_batch >= cuda_dense_crossover(k, bank_size, sizeof(T))) {
    at::Tensor dense = unpack_dense<T>(values, indices, k, bank_size, in_features);
    return at::linear(x2d, dense, bias);
  }
  at::Tensor y = at::empty({n_batch, out}, x2d.options());
  GatherParams p{};
  p.x = x2d.data_ptr();
  p.values = values.data_ptr();
  p.indices = indices.data_ptr<uint8_t>();
  p.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  p.y = y.data_ptr();
  p.n_batch = static_cast<int>(n_batch);
  p.in_features = static_cast<int>(in_features);
  p.out_features = static_cast<int>(out);
  p.row_len = static_cast<int>(values.size(1));
  p.k = static_cast<int>(k);
  p.bank_size = static_cast<int>(bank_size);
  launch_gather<T>(p, nb, /*lstm=*/false, /*max_group=*/32, x2d.get_device());
  return y;
}

at::Tensor balanced_linear_cuda(const at::Tensor& x, const at::Tensor& values,
                                const at::Tensor& indices, int64_t bank_size,
                                int64_t in_features, const std::optional<at::Tensor>& bias) {
  const int64_t k = check_balanced_linear_inputs(x, values, indices, bank_size, in_features, bias);
  TORCH_CHECK_VALUE(x.is_cuda(), "balanced_linear (CUDA): x must be a CUDA tensor, got ",
                    x.device());
  const c10::cuda::CUDAGuard guard(x.device());

  const int64_t out = values.size(0);
  const int64_t row_len = values.size(1);
  // Kernel index arithmetic is 32-bit per row (row + 32 must fit: rows past the end carry
  // a lane offset); j / k by multiply-high needs j * k < 2^32.
  TORCH_CHECK_VALUE(out <= INT32_MAX - 32 && in_features <= INT32_MAX &&
                        row_len * k < (int64_t{1} << 32),
                    "balanced_linear (CUDA): weight too large for the kernels (out=", out,
                    ", in_features=", in_features, ", n_banks*k=", row_len, ")");

  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end() - 1);
  out_shape.push_back(out);
  const at::Tensor x2d = x.reshape({-1, in_features}).contiguous();
  const at::Tensor vals = values.contiguous();
  const at::Tensor idx = indices.contiguous();
  std::optional<at::Tensor> b;
  if (bias.has_value()) b = bias->contiguous();

  if (x2d.size(0) == 0 || out == 0) return at::empty(out_shape, x.options());

  at::Tensor y;
  switch (x.scalar_type()) {
    case at::kFloat:
      y = run_typed<float>(x2d, vals, idx, b, k, bank_size, in_features);
      break;
    case at::kHalf:
      y = run_typed<__half>(x2d, vals, idx, b, k, bank_size, in_features);
      break;
    case at::kBFloat16:
      y = run_typed<__nv_bfloat16>(x2d, vals, idx, b, k, bank_size, in_features);
      break;
    default:
      // float64 (no kernel): dense product of the unpacked weight.
      y = at::linear(x2d, unpack_balanced_dense(vals, idx, bank_size, in_features, k), b);
  }
  return y.view(out_shape);
}

}  // namespace
}  // namespace bs_lightning::cuda

TORCH_LIBRARY_IMPL(bs_lightning, CUDA, m) {
  m.impl("balanced_linear", &bs_lightning::cuda::balanced_linear_cuda);
}
