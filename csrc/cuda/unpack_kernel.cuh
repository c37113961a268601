// Compact balanced weight -> dense [out, in_features] matrix, for the large-batch path
// (dense tensor-core product through cuBLAS). One block per (row, tile of whole banks): the
// tile is accumulated in fp32 shared memory (duplicated padding entries are summed, as
// `unpack_balanced` does), then written with coalesced 16-byte stores.
#pragma once

#include "device_utils.cuh"

namespace bs_lightning::cuda {

constexpr int kUnpackThreads = 256;
constexpr int kUnpackTileCols = 4096;  // columns per block, rounded down to whole banks

struct UnpackParams {
  const void* values;      // [out, row_len]
  const uint8_t* indices;  // [out, row_len]
  void* dense;             // [out, in_features]
  int out_features;
  int in_features;
  int row_len;
  int k;
  int bank_size;
  uint64_t k_magic;
  int tile_banks;  // banks per tile
  int n_tiles;     // tiles per row
};

// Shared-memory floats for one tile: a uint8 index may point up to 255 columns past its
// bank start, so the last bank of a tile gets 256 slots.
__host__ __device__ inline int unpack_smem_floats(int tile_banks, int bank_size) {
  return (tile_banks - 1) * bank_size + 256;
}

template <typename T>
__global__ void __launch_bounds__(kUnpackThreads) balanced_unpack_kernel(const UnpackParams p) {
  extern __shared__ __align__(16) float tile[];
  const int row = blockIdx.x / p.n_tiles;
  const int t = blockIdx.x - row * p.n_tiles;
  const int slots = unpack_smem_floats(p.tile_banks, p.bank_size);
  for (int i = threadIdx.x; i < slots; i += kUnpackThreads) tile[i] = 0.f;
  __syncthreads();

  const T* values = static_cast<const T*>(p.values);
  const size_t row_off = static_cast<size_t>(row) * p.row_len;
  const int bank0 = t * p.tile_banks;
  const int e0 = bank0 * p.k;
  const int e1 = min(e0 + p.tile_banks * p.k, p.row_len);
  for (int j = e0 + threadIdx.x; j < e1; j += kUnpackThreads) {
    const int bank = static_cast<int>(div_by_k(static_cast<uint32_t>(j), p.k_magic));
    const int slot = (bank - bank0) * p.bank_size + __ldg(p.indices + row_off + j);
    atomicAdd(tile + slot, to_float(__ldg(values + row_off + j)));
  }
  __syncthreads();

  const int c0 = bank0 * p.bank_size;
  T* dst = static_cast<T*>(p.dense) + static_cast<size_t>(row) * p.in_features + c0;
  const int n_cols = min(p.tile_banks * p.bank_size, p.in_features - c0);
  // 16-byte stores where this tile's start is 16-byte aligned, then a scalar remainder.
  constexpr int kV = 16 / static_cast<int>(sizeof(T));
  int done = 0;
  if (reinterpret_cast<uintptr_t>(dst) % 16 == 0) {
    const int n_vec = n_cols / kV;
    for (int v = threadIdx.x; v < n_vec; v += kUnpackThreads) {
      const float* f = tile + v * kV;
      uint32_t w[4];  // the 16 bytes as 4 words, assembled in registers
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        if constexpr (sizeof(T) == 4) {
          w[i] = bits_of(from_float<T>(f[i]));
        } else {
          w[i] = bits_of(from_float<T>(f[2 * i])) | (bits_of(from_float<T>(f[2 * i + 1])) << 16);
        }
      }
      reinterpret_cast<uint4*>(dst)[v] = make_uint4(w[0], w[1], w[2], w[3]);
    }
    done = n_vec * kV;
  }
  for (int c = done + threadIdx.x; c < n_cols; c += kUnpackThreads) dst[c] = from_float<T>(tile[c]);
}

}  // namespace bs_lightning::cuda
