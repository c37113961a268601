// Instantiates the bf16 gather kernels (SpMV/SpMM, gather_kernel.cuh) in their own
// translation unit, so the build compiles the dtypes in parallel.
#include "gather_kernel.cuh"

namespace bs_lightning::cuda {

template <>
GatherKernel gather_kernel_for<__nv_bfloat16>(bool vec, int nb, bool lstm) {
  return select_gather_kernel<__nv_bfloat16>(vec, nb, lstm);
}

}  // namespace bs_lightning::cuda
