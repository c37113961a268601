// The one schema definition of the bs_lightning ops. Device implementations register with
// TORCH_LIBRARY_IMPL in csrc/cpu/*.cpp and csrc/cuda/*.cu; the fake (meta) implementation
// is registered from Python (bs_lightning/ops.py) with torch.library.register_fake.
#include <torch/library.h>

#include "balanced_linear.h"

TORCH_LIBRARY(bs_lightning, m) {
  m.def(
      "balanced_linear(Tensor x, Tensor values, Tensor indices, int bank_size, "
      "int in_features, Tensor? bias=None) -> Tensor");
  // The same product on the CPU tile layout of bs_lightning.ops.pack_tiles (CPU only).
  m.def(
      "balanced_linear_tiled(Tensor x, Tensor values, Tensor indices, int bank_size, "
      "int in_features, int out_features, Tensor? bias=None) -> Tensor");
  // Backward products of balanced_linear (CPU), M * nnz multiply-adds each, no unpacking:
  // grad [M, out] -> dx [M, in]; grad [M, out], x [M, in] -> dvalues [out, n_banks * k].
  m.def(
      "balanced_linear_grad_input(Tensor grad, Tensor values, Tensor indices, int bank_size, "
      "int in_features) -> Tensor");
  m.def(
      "balanced_linear_grad_values(Tensor grad, Tensor x, Tensor indices, int bank_size, "
      "int in_features) -> Tensor");
  // The same two on the tile layout (fp32, CPU): values/indices [ceil(out / 16), width, 16];
  // grad_values returns that shape, zero in the rows past out.
  m.def(
      "balanced_linear_tiled_grad_input(Tensor grad, Tensor values, Tensor indices, "
      "int bank_size, int in_features) -> Tensor");
  m.def(
      "balanced_linear_tiled_grad_values(Tensor grad, Tensor x, Tensor indices, int bank_size, "
      "int in_features) -> Tensor");
  // One LSTM layer's recurrence (one direction) with W_hh in the tile layout (CPU only):
  // gates_x [T, B, 4H] = x W_ih^T + biases -> (out [T, B, H], h_T, c_T).
  m.def(
      "balanced_lstm_layer(Tensor gates_x, Tensor h0, Tensor c0, Tensor values, "
      "Tensor indices, int bank_size, bool reverse) -> (Tensor, Tensor, Tensor)");
  // One fused LSTM time step with a compact W_hh [4H, H] (CUDA kernel; on the CPU the
  // PyTorch reference): gates_x [B, 4H] + h W_hh^T -> (h' [B, H], c' [B, H]).
  m.def(
      "balanced_lstm_cell(Tensor gates_x, Tensor h, Tensor c, Tensor values, Tensor indices, "
      "int bank_size) -> (Tensor, Tensor)");
  // ISA of the tile kernel in this build: "avx512", "avx2" or "portable" (not vectorised).
  m.def("cpu_isa() -> str", &bs_lightning::cpu::cpu_isa);
  // Smallest number of input rows at which the tiled op unpacks to a dense GEMM.
  m.def("tiled_dense_crossover(int k, int bank_size) -> int",
        &bs_lightning::cpu::tiled_dense_crossover);
  // Smallest number of input rows at which the CUDA op unpacks to a dense GEMM (the modules
  // run their cached dense copy from there on instead).
  m.def("cuda_dense_crossover(int k, int bank_size, int elem_bytes) -> int",
        &bs_lightning::cuda_dense_crossover);
}
