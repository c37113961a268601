// Shared declarations of the balanced sparse product (docs/ARCHITECTURE.md section 3).
//
// balanced_linear(x [..., in], values [out, n_banks*k], indices uint8 [out, n_banks*k],
//                 bank_size, in_features, bias [out]?) -> [..., out]
// Entry j of row o is column (j / k) * bank_size + indices[o, j] with weight values[o, j].
//
// The checks below are mirrored one to one by the Python fake implementation
// (bs_lightning.ops.check_inputs): keep the two in sync, messages included.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <optional>
#include <string>

namespace bs_lightning {

constexpr int64_t kMaxBankSize = 256;  // in-bank indices are uint8

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// dtype as Python spells it ("torch.float32"), so messages match the Python checks.
inline std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kByte: return "torch.uint8";
    case at::kChar: return "torch.int8";
    case at::kShort: return "torch.int16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(t);
  }
}

// Checks shared by the ops (balanced_linear here, balanced_linear_tiled in csrc/cpu/);
// `op` prefixes every message. TORCH_CHECK_TYPE -> Python TypeError, TORCH_CHECK_VALUE ->
// Python ValueError.
inline void check_operand_dtypes(const char* op, const at::Tensor& x, const at::Tensor& values,
                                 const at::Tensor& indices) {
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), op, ": x must be floating point, got ",
                   dtype_name(x.scalar_type()));
  TORCH_CHECK_TYPE(values.scalar_type() == x.scalar_type(), op, ": values.dtype (",
                   dtype_name(values.scalar_type()), ") must equal x.dtype (",
                   dtype_name(x.scalar_type()), ")");
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kByte, op, ": indices must be torch.uint8, got ",
                   dtype_name(indices.scalar_type()));
}

inline void check_bank_size(const char* op, int64_t bank_size, int64_t largest, const char* why) {
  TORCH_CHECK_VALUE(bank_size >= 1 && bank_size <= largest, op, ": bank_size must be in 1..",
                    largest, " (", why, "), got ", bank_size);
}

inline void check_x(const char* op, const at::Tensor& x, int64_t in_features) {
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == in_features, op,
                    ": x must have shape [..., in_features=", in_features, "], got ", x.sizes());
}

inline void check_same_shape(const char* op, const at::Tensor& values, const at::Tensor& indices) {
  TORCH_CHECK_VALUE(indices.sizes() == values.sizes(), op, ": indices shape ", indices.sizes(),
                    " must equal values shape ", values.sizes());
}

// Entries per row must be whole banks of k <= bank_size entries; returns k.
inline int64_t check_width(const char* op, int64_t width, int64_t bank_size, int64_t in_features) {
  const int64_t n_banks = ceil_div(in_features, bank_size);
  TORCH_CHECK_VALUE(width > 0 && width % n_banks == 0, op, ": values.size(1) (", width,
                    ") must be a positive multiple of n_banks = ceil(in_features / bank_size) = ",
                    n_banks);
  const int64_t k = width / n_banks;
  TORCH_CHECK_VALUE(k <= bank_size, op, ": keep-count k = ", k, " per bank exceeds bank_size = ",
                    bank_size);
  return k;
}

inline void check_devices_and_bias(const char* op, const at::Tensor& x, const at::Tensor& values,
                                   const at::Tensor& indices,
                                   const std::optional<at::Tensor>& bias, const char* out_label,
                                   int64_t out) {
  TORCH_CHECK_VALUE(values.device() == x.device() && indices.device() == x.device(), op, ": x (",
                    x.device(), "), values (", values.device(), ") and indices (",
                    indices.device(), ") must be on the same device");
  if (!bias.has_value()) return;
  const at::Tensor& b = *bias;
  TORCH_CHECK_TYPE(b.scalar_type() == x.scalar_type(), op, ": bias.dtype (",
                   dtype_name(b.scalar_type()), ") must equal x.dtype (",
                   dtype_name(x.scalar_type()), ")");
  TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == out, op, ": bias must have shape [", out_label,
                    "=", out, "], got ", b.sizes());
  TORCH_CHECK_VALUE(b.device() == x.device(), op, ": bias (", b.device(),
                    ") must be on x's device (", x.device(), ")");
}

// Validates balanced_linear's arguments; returns the keep-count k per bank.
inline int64_t check_balanced_linear_inputs(const at::Tensor& x, const at::Tensor& values,
                                            const at::Tensor& indices, int64_t bank_size,
                                            int64_t in_features,
                                            const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "balanced_linear";
  check_operand_dtypes(op, x, values, indices);
  check_bank_size(op, bank_size, kMaxBankSize, "uint8 in-bank indices");
  TORCH_CHECK_VALUE(in_features >= 1, op, ": in_features must be >= 1, got ", in_features);
  check_x(op, x, in_features);
  TORCH_CHECK_VALUE(values.dim() == 2, op, ": values must be 2-D [out, n_banks * k], got ",
                    values.sizes());
  check_same_shape(op, values, indices);
  const int64_t k = check_width(op, values.size(1), bank_size, in_features);
  check_devices_and_bias(op, x, values, indices, bias, "out", values.size(0));
  return k;
}

// Dense [out, in_features] matrix of the compact weight (duplicates summed): the fallback
// of every backend for large batches and dtypes without a kernel. Raises on bad indices.
inline at::Tensor unpack_balanced_dense(const at::Tensor& values, const at::Tensor& indices,
                                        int64_t bank_size, int64_t in_features, int64_t k) {
  const int64_t width = values.size(1);
  at::Tensor bank_start =
      at::arange(width, indices.options().dtype(at::kLong)).div(k, "floor").mul(bank_size);
  at::Tensor columns = indices.to(at::kLong).add(bank_start);  // [out, width]
  return at::zeros({values.size(0), in_features}, values.options())
      .scatter_add_(1, columns, values);
}

// Smallest number of input rows N from which the CUDA op unpacks to a dense matrix and calls
// cuBLAS (rule in csrc/cuda/balanced_linear_cuda.cu): N* = 2 * elem_bytes * 2 / density,
// clamped to [2, 4096]; BS_LIGHTNING_CUDA_DENSE_MIN_BATCH=<N> overrides it. Here, and not in
// the .cu, so that the modules (which then run a cached dense copy instead of unpacking per
// call) and the op agree, also in a build without CUDA.
constexpr const char* kCudaDenseMinBatchEnv = "BS_LIGHTNING_CUDA_DENSE_MIN_BATCH";

// The value of the environment variable `name` (rows >= 1), or -1 when it is not set.
inline int64_t min_batch_from_env(const char* name) {
  const char* env = std::getenv(name);
  if (env == nullptr) return -1;
  char* end = nullptr;
  const long long v = std::strtoll(env, &end, 10);
  TORCH_CHECK_VALUE(end != env && *end == '\0' && v >= 1, name, " must be an integer >= 1, got '",
                    env, "'");
  return v;
}

inline int64_t cuda_dense_crossover(int64_t k, int64_t bank_size, int64_t elem_bytes) {
  if (const int64_t v = min_batch_from_env(kCudaDenseMinBatchEnv); v > 0) return v;
  TORCH_CHECK_VALUE(k >= 1 && bank_size >= k && elem_bytes >= 1,
                    "cuda_dense_crossover: need 1 <= k <= bank_size and elem_bytes >= 1, got k=",
                    k, ", bank_size=", bank_size, ", elem_bytes=", elem_bytes);
  constexpr double kGatherMacPerByte = 2.0;
  const double density = static_cast<double>(k) / static_cast<double>(bank_size);
  const double n = 2.0 * static_cast<double>(elem_bytes) * kGatherMacPerByte / density;
  return std::clamp<int64_t>(static_cast<int64_t>(std::ceil(n)), 2, 4096);
}

// Smallest number of input rows from which the CPU tile op unpacks to a dense matrix and
// calls the GEMM (rule in csrc/cpu/balanced_linear_tiled_cpu.cpp);
// BS_LIGHTNING_CPU_DENSE_MIN_BATCH=<N> overrides it (e.g. to time the kernel past it).
constexpr const char* kCpuDenseMinBatchEnv = "BS_LIGHTNING_CPU_DENSE_MIN_BATCH";

namespace cpu {
// csrc/cpu/balanced_linear_tiled_cpu.cpp
std::string cpu_isa();
int64_t tiled_dense_crossover(int64_t k, int64_t bank_size);
}  // namespace cpu

}  // namespace bs_lightning
