// CUDA op bs_lightning::balanced_lstm_cell: one fused LSTM time step with a balanced-sparse
// recurrent matrix, for batch-1 generation where a step is otherwise ~12 tiny kernels.
//
//   gates = gates_x + h @ W_hh^T          (W_hh [4H, H] compact: values/indices, PyTorch
//   i, f, g, o = gates.chunk(4, dim=-1)    gate order input, forget, cell, output)
//   c' = sigmoid(f) * c + sigmoid(i) * tanh(g);   h' = sigmoid(o) * tanh(c')
//
// gates_x [B, 4H] is the step's input projection with both biases folded in (one
// balanced_linear over the whole sequence computes it). Returns (h' [B, H], c' [B, H]).
// One launch of the gather kernel in LSTM mode (gather_kernel.cuh): no intermediate gate
// tensor, fp32 gate arithmetic. The schema is in csrc/ops.cpp; the CPU kernel is the
// PyTorch reference (bs_lightning.ops.lstm_cell_reference).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "balanced_linear.h"
#include "gather_launch.h"

namespace bs_lightning::cuda {
namespace {

template <typename T>
void launch_cell(const at::Tensor& gates_x, const at::Tensor& h, const at::Tensor& c,
                 const at::Tensor& values, const at::Tensor& indices, int64_t bank_size,
                 int64_t k, at::Tensor& h_new, at::Tensor& c_new) {
  const int64_t batch = h.size(0);
  const int64_t hidden = h.size(1);
  const int nb = batch == 1 ? 1 : 8;
  TORCH_CHECK_VALUE(gather_smem_bytes(hidden, bank_size, nb, sizeof(T)) <= smem_optin(),
                    "balanced_lstm_cell (CUDA): hidden size ", hidden,
                    " too large to stage h in shared memory");
  GatherParams p{};
  p.x = h.data_ptr();
  p.values = values.data_ptr();
  p.indices = indices.data_ptr<uint8_t>();
  p.n_batch = static_cast<int>(batch);
  p.in_features = static_cast<int>(hidden);
  p.out_features = static_cast<int>(4 * hidden);
  p.row_len = static_cast<int>(values.size(1));
  p.k = static_cast<int>(k);
  p.bank_size = static_cast<int>(bank_size);
  p.gates_x = gates_x.data_ptr();
  p.c_in = c.data_ptr();
  p.h_out = h_new.data_ptr();
  p.c_out = c_new.data_ptr();
  p.hidden = static_cast<int>(hidden);
  // 4 rows per warp at least: a quad of row groups holds the 4 gates of one unit.
  launch_gather<T>(p, nb, /*lstm=*/true, /*max_group=*/8, h.get_device());
}

std::tuple<at::Tensor, at::Tensor> balanced_lstm_cell_cuda(const at::Tensor& gates_x,
                                                           const at::Tensor& h,
                                                           const at::Tensor& c,
                                                           const at::Tensor& values,
                                                           const at::Tensor& indices,
                                                           int64_t bank_size) {
  TORCH_CHECK_VALUE(h.dim() == 2, "balanced_lstm_cell: h must be 2-D [batch, hidden], got ",
                    h.sizes());
  const int64_t batch = h.size(0);
  const int64_t hidden = h.size(1);
  // values/indices/bank_size/devices/dtype of h, as for balanced_linear with x = h.
  const int64_t k = check_balanced_linear_inputs(h, values, indices, bank_size, hidden, {});
  TORCH_CHECK_TYPE(h.scalar_type() == at::kFloat || h.scalar_type() == at::kHalf ||
                       h.scalar_type() == at::kBFloat16,
                   "balanced_lstm_cell: h must be float32, float16 or bfloat16, got ",
                   h.scalar_type());
  TORCH_CHECK_VALUE(values.size(0) == 4 * hidden, "balanced_lstm_cell: values must have 4 * ",
                    "hidden = ", 4 * hidden, " rows (gates i, f, g, o), got ", values.size(0));
  TORCH_CHECK_VALUE(c.sizes() == h.sizes(), "balanced_lstm_cell: c shape ", c.sizes(),
                    " must equal h shape ", h.sizes());
  TORCH_CHECK_VALUE(gates_x.dim() == 2 && gates_x.size(0) == batch &&
                        gates_x.size(1) == 4 * hidden,
                    "balanced_lstm_cell: gates_x must have shape [", batch, ", ", 4 * hidden,
                    "], got ", gates_x.sizes());
  for (const at::Tensor* t : {&c, &gates_x}) {
    TORCH_CHECK_TYPE(t->scalar_type() == h.scalar_type(), "balanced_lstm_cell: c and gates_x ",
                     "must have h's dtype (", h.scalar_type(), "), got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->device() == h.device(), "balanced_lstm_cell: c and gates_x must be ",
                      "on h's device (", h.device(), "), got ", t->device());
  }
  TORCH_CHECK_VALUE(h.is_cuda(), "balanced_lstm_cell: CUDA only, got tensors on ", h.device());
  TORCH_CHECK_VALUE(values.size(1) * k < (int64_t{1} << 32) && hidden <= (1 << 28),
                    "balanced_lstm_cell (CUDA): matrix too large for the kernel");
  const c10::cuda::CUDAGuard guard(h.device());

  const at::Tensor h_c = h.contiguous();
  const at::Tensor c_c = c.contiguous();
  const at::Tensor gx = gates_x.contiguous();
  const at::Tensor vals = values.contiguous();
  const at::Tensor idx = indices.contiguous();
  at::Tensor h_new = at::empty_like(h_c);
  at::Tensor c_new = at::empty_like(c_c);
  if (batch == 0) return {h_new, c_new};
  switch (h.scalar_type()) {
    case at::kFloat:
      launch_cell<float>(gx, h_c, c_c, vals, idx, bank_size, k, h_new, c_new);
      break;
    case at::kHalf:
      launch_cell<__half>(gx, h_c, c_c, vals, idx, bank_size, k, h_new, c_new);
      break;
    default:
      launch_cell<__nv_bfloat16>(gx, h_c, c_c, vals, idx, bank_size, k, h_new, c_new);
  }
  return {h_new, c_new};
}

}  // namespace
}  // namespace bs_lightning::cuda

TORCH_LIBRARY_IMPL(bs_lightning, CUDA, m) {
  m.impl("balanced_lstm_cell", &bs_lightning::cuda::balanced_lstm_cell_cuda);
}
