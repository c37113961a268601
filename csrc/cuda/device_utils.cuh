// Device helpers shared by the balanced sparse CUDA kernels: dtype conversion, vector types
// for wide loads, and division by the runtime keep-count k without an integer divide.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace bs_lightning::cuda {

// ---- dtype conversion (all arithmetic is fp32) -------------------------------------------
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Raw bits of a value (16-bit types in the low half).
__device__ __forceinline__ uint32_t bits_of(float v) { return __float_as_uint(v); }
__device__ __forceinline__ uint32_t bits_of(__half v) { return __half_as_ushort(v); }
__device__ __forceinline__ uint32_t bits_of(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }

// ---- vector types: one load/store instruction of kBytes bytes ------------------------------
template <int kBytes>
struct VecOf;
template <>
struct VecOf<1> {
  using type = uint8_t;
};
template <>
struct VecOf<2> {
  using type = uint16_t;
};
template <>
struct VecOf<4> {
  using type = uint32_t;
};
template <>
struct VecOf<8> {
  using type = uint2;
};
template <>
struct VecOf<16> {
  using type = uint4;
};
template <int kBytes>
using Vec = typename VecOf<kBytes>::type;

template <typename V>
__device__ __forceinline__ V zero_vec() {
  V v;
  // Byte-wise zero of a register value; the compiler turns it into register moves.
  unsigned char* b = reinterpret_cast<unsigned char*>(&v);
#pragma unroll
  for (int i = 0; i < static_cast<int>(sizeof(V)); ++i) b[i] = 0;
  return v;
}

// Read-only global load (read through the non-coherent path; the data never changes during
// a kernel).
template <typename V>
__device__ __forceinline__ V load_ro(const void* p) {
  return __ldg(reinterpret_cast<const V*>(p));
}
template <>
__device__ __forceinline__ uint8_t load_ro<uint8_t>(const void* p) {
  return __ldg(reinterpret_cast<const unsigned char*>(p));
}
template <>
__device__ __forceinline__ uint16_t load_ro<uint16_t>(const void* p) {
  return __ldg(reinterpret_cast<const unsigned short*>(p));
}

// ---- j / k for a runtime k ------------------------------------------------------------------
// magic = floor(2^32 / k) + 1. Then floor(j * magic / 2^32) == floor(j / k) whenever
// j * k < 2^32 (the error term j * (magic * k - 2^32) / 2^32 stays below 1/k). The host
// checks that every entry index j of a row satisfies this.
inline uint64_t div_magic(uint32_t k) { return (uint64_t{1} << 32) / k + 1; }

__device__ __forceinline__ uint32_t div_by_k(uint32_t j, uint64_t magic) {
  return static_cast<uint32_t>((static_cast<uint64_t>(j) * magic) >> 32);
}

}  // namespace bs_lightning::cuda
