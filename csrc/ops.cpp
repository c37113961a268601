// The one schema definition of the bs_lightning ops. Device implementations register with
// TORCH_LIBRARY_IMPL in csrc/cpu/*.cpp and csrc/cuda/*.cu; the fake (meta) implementation
// is registered from Python (bs_lightning/ops.py) with torch.library.register_fake.
#include <torch/library.h>

TORCH_LIBRARY(bs_lightning, m) {
  m.def(
      "balanced_linear(Tensor x, Tensor values, Tensor indices, int bank_size, "
      "int in_features, Tensor? bias=None) -> Tensor");
}
