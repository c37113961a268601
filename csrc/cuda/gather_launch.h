// Host side of the gather kernel (gather_kernel.cuh): shared-memory size, work split
// (lanes per row, passes), persistent grid and launch. Used by balanced_linear_cuda.cu and
// lstm_cell_cuda.cu.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>

#include "gather_kernel.cuh"

namespace bs_lightning::cuda {

inline bool aligned(const void* ptr, size_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

// Columns of the staged x: every uint8 index of every bank lands inside (zeros past
// in_features).
inline int64_t staged_x_cols(int64_t in_features, int64_t bank_size) {
  const int64_t n_banks = (in_features + bank_size - 1) / bank_size;
  return (n_banks - 1) * bank_size + 256;
}

// Dynamic shared memory of the gather kernel: staged x for nb batch columns, 16-byte rounded.
inline size_t gather_smem_bytes(int64_t in_features, int64_t bank_size, int nb,
                                size_t elem_bytes) {
  const int64_t bytes = staged_x_cols(in_features, bank_size) * nb * static_cast<int64_t>(elem_bytes);
  return static_cast<size_t>((bytes + 15) / 16 * 16);
}

inline size_t smem_optin() {
  return at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
}

// Resident blocks per multiprocessor of `kernel` with `smem` dynamic shared bytes. The first
// use on a device also raises the kernel's dynamic shared memory limit to the device's
// opt-in maximum. Cached: neither call is repeated inside CUDA-graph captures of later calls.
inline int blocks_per_sm(GatherKernel kernel, int device, size_t smem) {
  static std::mutex mutex;
  static std::map<std::tuple<int, GatherKernel, size_t>, int> cache;
  static std::map<std::pair<int, GatherKernel>, bool> raised;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find({device, kernel, smem});
  if (it != cache.end()) return it->second;
  if (!raised[{device, kernel}]) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                        cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem_optin())));
    raised[{device, kernel}] = true;
  }
  int blocks = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &blocks, reinterpret_cast<const void*>(kernel), kGatherThreads, smem));
  TORCH_CHECK(blocks >= 1, "bs_lightning (CUDA): gather kernel cannot run with ", smem,
              " bytes of shared memory");
  cache[{device, kernel, smem}] = blocks;
  return blocks;
}

// Completes `p` (pointers, sizes, k, bank_size and, for LSTM mode, the cell tensors set by
// the caller) with the work split and launches on torch's current stream. `nb` batch
// columns per block (its shared memory must fit: see gather_smem_bytes); `max_group` caps
// the lanes per row (LSTM mode needs 4 rows per warp: 8).
template <typename T>
void launch_gather(GatherParams p, int nb, bool lstm, int max_group, int device) {
  constexpr int kV = 16 / static_cast<int>(sizeof(T));
  const bool vec = aligned(p.values, 16) && aligned(p.indices, kV);
  const int vec_len = vec ? kV : 1;
  // Aligned chunks per row (at most; rows with a misaligned start have one fewer).
  const int chunks = p.row_len / vec_len;
  int group = 1;
  while (group < max_group && group * kGatherUnroll < chunks) group <<= 1;
  int log2_group = 0;
  while ((1 << log2_group) < group) ++log2_group;

  p.k_magic = div_magic(static_cast<uint32_t>(p.k));
  p.xs_cols = static_cast<int>(staged_x_cols(p.in_features, p.bank_size));
  p.log2_group = log2_group;
  p.passes = (chunks + group * kGatherUnroll - 1) / (group * kGatherUnroll);
  p.x_vec_ok = aligned(p.x, 16) && p.in_features % kV == 0;

  const size_t smem = gather_smem_bytes(p.in_features, p.bank_size, nb, sizeof(T));
  const GatherKernel kernel = gather_kernel_for<T>(vec, nb, lstm);
  const int resident =
      blocks_per_sm(kernel, device, smem) * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t batch_chunks = (p.n_batch + nb - 1) / nb;
  TORCH_CHECK(batch_chunks <= 65535, "bs_lightning (CUDA): batch ", p.n_batch,
              " too large for the gather kernel");
  const int64_t rows_per_block = (kGatherThreads / 32) * (32 / group);
  const int64_t blocks_needed = (p.out_features + rows_per_block - 1) / rows_per_block;
  // Persistent grid: about as many blocks as are resident at once, split over batch chunks.
  const int64_t grid_x = std::max<int64_t>(
      1, std::min<int64_t>(blocks_needed, (resident + batch_chunks - 1) / batch_chunks));
  const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(batch_chunks));
  kernel<<<grid, kGatherThreads, smem, at::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace bs_lightning::cuda
