// CPU implementations of the backward products of bs_lightning::balanced_linear (schemas in
// csrc/ops.cpp), used by the autograd formulas in bs_lightning/ops.py:
//
//   balanced_linear_grad_input(grad [M, out], values [out, width], indices, bank_size, in)
//     -> dx [M, in],          dx[m, c] = sum of grad[m, o] * values[o, j] over the entries
//                                        (o, j) at column c
//   balanced_linear_grad_values(grad [M, out], x [M, in], indices, bank_size, in)
//     -> dvalues [out, width], dvalues[o, j] = sum_m grad[m, o] * x[m, col(o, j)]
//
// with col(o, j) = (j / k) * bank_size + indices[o, j]. Both cost M * nnz multiply-adds,
// where the dense products cost M * out * in, and never unpack the matrix. They run on
// transposed copies (grad^T [out, M], x^T [in + 256, M], zero past in, so any uint8 index stays inside), so the inner
// loops run over M contiguously, in chunks of input rows whose slices stay in L1/L2.
// Accumulation is in fp32 for fp32/fp16/bf16 and in fp64 for fp64 (gradcheck).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "balanced_linear.h"

namespace bs_lightning::cpu {
namespace {

constexpr int64_t kSlabBytes = int64_t{256} << 10;  // dx^T chunk kept in L2 per thread
constexpr int64_t kPad = 256;  // rows past in_features of x^T and dx^T: any uint8 index fits

// grad [M, out], values [out, width], indices; checks shared by the two ops.
int64_t check_backward_inputs(const char* op, const at::Tensor& grad, const at::Tensor& other,
                              const at::Tensor& indices, int64_t bank_size, int64_t in_features) {
  TORCH_CHECK_TYPE(at::isFloatingType(grad.scalar_type()), op,
                   ": grad must be floating point, got ", dtype_name(grad.scalar_type()));
  TORCH_CHECK_TYPE(other.scalar_type() == grad.scalar_type(), op, ": dtypes of grad (",
                   dtype_name(grad.scalar_type()), ") and its operand (",
                   dtype_name(other.scalar_type()), ") must be equal");
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kByte, op, ": indices must be torch.uint8, got ",
                   dtype_name(indices.scalar_type()));
  check_bank_size(op, bank_size, kMaxBankSize, "in-bank indices are uint8");
  TORCH_CHECK_VALUE(in_features >= 1, op, ": in_features must be >= 1, got ", in_features);
  TORCH_CHECK_VALUE(indices.dim() == 2 && grad.dim() == 2 && grad.size(1) == indices.size(0), op,
                    ": grad must be [M, out] and indices [out, width], got ", grad.sizes(),
                    " and ", indices.sizes());
  return check_width(op, indices.size(1), bank_size, in_features);
}

// Column of entry j of every row, before its in-bank index: (j / k) * bank_size.
std::vector<int64_t> bank_starts(int64_t width, int64_t k, int64_t bank_size) {
  std::vector<int64_t> start(width);
  for (int64_t j = 0; j < width; ++j) start[j] = j / k * bank_size;
  return start;
}

// dx^T [in, M] in chunks of C input rows: each thread owns its chunks' slab [in + kPad, C],
// so no two threads write the same column.
template <typename A>
void grad_input_kernel(const A* gt, const A* v, const uint8_t* idx, int64_t M, int64_t out,
                       int64_t width, int64_t in, const std::vector<int64_t>& start, A* dx) {
  const int64_t ld = in + kPad;
  const int64_t C = std::clamp<int64_t>(kSlabBytes / (ld * int64_t{sizeof(A)}), 8, 256);
  const int64_t n_chunks = ceil_div(M, C);
  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<A> slab(static_cast<size_t>(ld * C));
    for (int64_t chunk = c0; chunk < c1; ++chunk) {
      const int64_t m0 = chunk * C, n = std::min(C, M - m0);
      std::fill(slab.begin(), slab.end(), A(0));
      for (int64_t o = 0; o < out; ++o) {
        const A* g = gt + o * M + m0;
        for (int64_t j = 0; j < width; ++j) {
          const A w = v[o * width + j];
          A* dst = slab.data() + (start[j] + idx[o * width + j]) * C;
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) dst[i] += w * g[i];
        }
      }
      for (int64_t i = 0; i < n; ++i) {
        A* row = dx + (m0 + i) * in;
        for (int64_t c = 0; c < in; ++c) row[c] = slab[c * C + i];
      }
    }
  });
}

// dvalues [out, width]: rows split across threads; for each chunk of C input rows a thread
// dots its rows' grad^T slice with the x^T slices of their entries' columns.
template <typename A>
void grad_values_kernel(const A* gt, const A* xt, const uint8_t* idx, int64_t M, int64_t out,
                        int64_t width, const std::vector<int64_t>& start, A* dv) {
  constexpr int64_t C = 256;
  at::parallel_for(0, out, 16, [&](int64_t o0, int64_t o1) {
    std::fill(dv + o0 * width, dv + o1 * width, A(0));
    for (int64_t m0 = 0; m0 < M; m0 += C) {
      const int64_t n = std::min(C, M - m0);
      for (int64_t o = o0; o < o1; ++o) {
        const A* g = gt + o * M + m0;
        for (int64_t j = 0; j < width; ++j) {
          const A* xc = xt + (start[j] + idx[o * width + j]) * M + m0;
          A s = 0;
#pragma omp simd reduction(+ : s)
          for (int64_t i = 0; i < n; ++i) s += g[i] * xc[i];
          dv[o * width + j] += s;
        }
      }
    }
  });
}

// [M, cols] -> [cols + pad, M] in the accumulation dtype, zero in the pad rows.
at::Tensor transposed(const at::Tensor& t, int64_t pad, at::ScalarType acc) {
  at::Tensor out = at::zeros({t.size(1) + pad, t.size(0)}, t.options().dtype(acc));
  out.narrow(0, 0, t.size(1)).copy_(t.t());
  return out;
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace

at::Tensor balanced_linear_grad_input_cpu(const at::Tensor& grad, const at::Tensor& values,
                                          const at::Tensor& indices, int64_t bank_size,
                                          int64_t in_features) {
  constexpr const char* op = "balanced_linear_grad_input";
  const int64_t k = check_backward_inputs(op, grad, values, indices, bank_size, in_features);
  check_same_shape(op, values, indices);
  const auto acc = acc_type(grad.scalar_type());
  const int64_t M = grad.size(0), out = indices.size(0), width = indices.size(1);
  at::Tensor dx = at::empty({M, in_features}, grad.options().dtype(acc));
  if (M == 0) return dx.to(grad.scalar_type());
  const at::Tensor gt = transposed(grad, 0, acc);
  const at::Tensor v = values.to(acc).contiguous();
  const at::Tensor idx = indices.contiguous();
  const auto start = bank_starts(width, k, bank_size);
  AT_DISPATCH_FLOATING_TYPES(acc, op, [&] {
    grad_input_kernel<scalar_t>(gt.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
                                idx.const_data_ptr<uint8_t>(), M, out, width, in_features, start,
                                dx.mutable_data_ptr<scalar_t>());
  });
  return dx.to(grad.scalar_type());
}

at::Tensor balanced_linear_grad_values_cpu(const at::Tensor& grad, const at::Tensor& x,
                                           const at::Tensor& indices, int64_t bank_size,
                                           int64_t in_features) {
  constexpr const char* op = "balanced_linear_grad_values";
  const int64_t k = check_backward_inputs(op, grad, x, indices, bank_size, in_features);
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(0) == grad.size(0) && x.size(1) == in_features, op,
                    ": x must be [M = ", grad.size(0), ", in_features = ", in_features,
                    "], got ", x.sizes());
  const auto acc = acc_type(grad.scalar_type());
  const int64_t M = grad.size(0), out = indices.size(0), width = indices.size(1);
  at::Tensor dv = at::empty({out, width}, grad.options().dtype(acc));
  const at::Tensor gt = transposed(grad, 0, acc);
  const at::Tensor xt = transposed(x, kPad, acc);
  const at::Tensor idx = indices.contiguous();
  const auto start = bank_starts(width, k, bank_size);
  AT_DISPATCH_FLOATING_TYPES(acc, op, [&] {
    grad_values_kernel<scalar_t>(gt.const_data_ptr<scalar_t>(), xt.const_data_ptr<scalar_t>(),
                                 idx.const_data_ptr<uint8_t>(), M, out, width, start,
                                 dv.mutable_data_ptr<scalar_t>());
  });
  return dv.to(grad.scalar_type());
}

}  // namespace bs_lightning::cpu

TORCH_LIBRARY_IMPL(bs_lightning, CPU, m) {
  m.impl("balanced_linear_grad_input", &bs_lightning::cpu::balanced_linear_grad_input_cpu);
  m.impl("balanced_linear_grad_values", &bs_lightning::cpu::balanced_linear_grad_values_cpu);
}
