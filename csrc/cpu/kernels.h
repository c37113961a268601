// CPU inner loops of the balanced sparse product. Built with -march=native: the AVX-512 or
// AVX2 paths are chosen at compile time, with a portable scalar path otherwise.
//
// Both kernels read x through a float copy padded with kIndexPad zero rows, so an index that
// is wrong (but < 256) reads zeros or a wrong column, never memory outside the buffer.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace bs_lightning::cpu {

constexpr int64_t kIndexPad = 256;  // zero rows after x: bank start + any uint8 index fits
constexpr int kPrefetchBytes = 4096;  // software prefetch distance of the batch-1 streams
constexpr int64_t kSumBlock = 64;     // entries per inner partial sum of the batch kernel

template <typename V>
inline float to_float(V v) {
  return static_cast<float>(v);
}

#if defined(__AVX512F__)
template <typename V>
inline __m512 load16(const V* p);
template <>
inline __m512 load16<float>(const float* p) {
  return _mm512_loadu_ps(p);
}
template <>
inline __m512 load16<c10::BFloat16>(const c10::BFloat16* p) {
  // bf16 is the upper half of an fp32: widen to 32 bits and shift left.
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
template <>
inline __m512 load16<c10::Half>(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
// Absolute columns of 16 entries: uint8 in-bank index widened to int32 + bank start.
inline __m512i columns16(const uint8_t* idx, const int32_t* bank_start) {
  const __m512i in_bank = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(idx)));
  return _mm512_add_epi32(in_bank, _mm512_loadu_si512(bank_start));
}
#elif defined(__AVX2__)
template <typename V>
inline __m256 load8(const V* p);
template <>
inline __m256 load8<float>(const float* p) {
  return _mm256_loadu_ps(p);
}
template <>
inline __m256 load8<c10::BFloat16>(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
template <>
inline __m256 load8<c10::Half>(const c10::Half* p) {
#if defined(__F16C__)
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  alignas(32) float f[8];
  for (int i = 0; i < 8; ++i) f[i] = static_cast<float>(p[i]);
  return _mm256_load_ps(f);
#endif
}
inline __m256i columns8(const uint8_t* idx, const int32_t* bank_start) {
  const __m256i in_bank = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(idx)));
  return _mm256_add_epi32(in_bank, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bank_start)));
}
#endif

// Batch 1: one row's dot product sum_j v[j] * xp[bank_start[j] + idx[j]], j < width.
// Vectorised over the row's entries: contiguous loads of values and indices, a gather of x.
template <typename V>
inline float row_dot(const V* v, const uint8_t* idx, const int32_t* bank_start, const float* xp,
                     int64_t width) {
  int64_t j = 0;
  float sum = 0.f;
#if defined(__AVX512F__)
  // Two accumulators hide the FMA latency; rows are independent so gathers overlap.
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  for (; j + 32 <= width; j += 32) {
    // Gathers crowd the out-of-order window; prefetch the value/index streams ahead.
    // 32 fp32 values span two cache lines (bf16/fp16: one), 32 indices half a line.
    _mm_prefetch(reinterpret_cast<const char*>(v + j) + kPrefetchBytes, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(v + j + 16) + kPrefetchBytes, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(idx + j) + kPrefetchBytes / 4, _MM_HINT_T0);
    const __m512 x0 = _mm512_i32gather_ps(columns16(idx + j, bank_start + j), xp, 4);
    const __m512 x1 = _mm512_i32gather_ps(columns16(idx + j + 16, bank_start + j + 16), xp, 4);
    acc0 = _mm512_fmadd_ps(load16(v + j), x0, acc0);
    acc1 = _mm512_fmadd_ps(load16(v + j + 16), x1, acc1);
  }
  for (; j + 16 <= width; j += 16) {
    const __m512 x0 = _mm512_i32gather_ps(columns16(idx + j, bank_start + j), xp, 4);
    acc0 = _mm512_fmadd_ps(load16(v + j), x0, acc0);
  }
  sum = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
#elif defined(__AVX2__)
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; j + 16 <= width; j += 16) {
    const __m256 x0 = _mm256_i32gather_ps(xp, columns8(idx + j, bank_start + j), 4);
    const __m256 x1 = _mm256_i32gather_ps(xp, columns8(idx + j + 8, bank_start + j + 8), 4);
    acc0 = _mm256_fmadd_ps(load8(v + j), x0, acc0);
    acc1 = _mm256_fmadd_ps(load8(v + j + 8), x1, acc1);
  }
  for (; j + 8 <= width; j += 8) {
    const __m256 x0 = _mm256_i32gather_ps(xp, columns8(idx + j, bank_start + j), 4);
    acc0 = _mm256_fmadd_ps(load8(v + j), x0, acc0);
  }
  const __m256 a = _mm256_add_ps(acc0, acc1);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  sum = _mm_cvtss_f32(s);
#endif
  for (; j < width; ++j) sum += to_float(v[j]) * xp[bank_start[j] + idx[j]];
  return sum;
}

// Batch > 1: x is stored transposed per batch tile, xt [in + kIndexPad, L * NV] (one tile),
// so every nonzero is one broadcast value times a contiguous run of the tile's batch
// columns. R rows advance in lockstep (all rows have the same width) to give R * NV
// independent accumulator chains per entry.
template <int L>
struct FloatVec;
template <>
struct FloatVec<8> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct FloatVec<16> {
  typedef float type __attribute__((vector_size(64)));
};

// Rows [o0, o0 + R) against one tile, entries [j_begin, j_end) of each row (whole banks):
// out[b0 + l, o] (fp32) for the tile's nb valid lanes is set to bias + partial sum when
// j_begin == 0, else the partial sum is added to it.
template <typename V, int L, int NV, int R>
inline void tile_rows(const V* values, const uint8_t* indices, const int32_t* bank_start,
                      int64_t width, int64_t j_begin, int64_t j_end, const float* xt, int64_t o0,
                      const float* bias, float* out, int64_t out_features, int64_t b0,
                      int64_t nb) {
  using vec = typename FloatVec<L>::type;
  constexpr int64_t TB = int64_t{L} * NV;
  vec acc[R][NV];
  const V* vr[R];
  const uint8_t* ir[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    vr[r] = values + (o0 + r) * width;
    ir[r] = indices + (o0 + r) * width;
#pragma GCC unroll 16
    for (int n = 0; n < NV; ++n) acc[r][n] = vec{};
  }
  // Two-level sum: each block of kSumBlock entries is summed on its own, then added to acc,
  // so a long row's rounding error grows with kSumBlock + width / kSumBlock, not width
  // (a plain running sum over thousands of entries lost to torch's blocked GEMM accuracy).
  for (int64_t jb = j_begin; jb < j_end; jb += kSumBlock) {
    const int64_t je = std::min(j_end, jb + kSumBlock);
    vec blk[R][NV];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 16
      for (int n = 0; n < NV; ++n) blk[r][n] = vec{};
    }
    for (int64_t j = jb; j < je; ++j) {
      const int64_t start = bank_start[j];
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const float w = to_float(vr[r][j]);
        const float* xrow = xt + (start + ir[r][j]) * TB;
#pragma GCC unroll 16
        for (int n = 0; n < NV; ++n) {
          vec xv;
          std::memcpy(&xv, xrow + n * L, sizeof(vec));
          blk[r][n] += w * xv;
        }
      }
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 16
      for (int n = 0; n < NV; ++n) acc[r][n] += blk[r][n];
    }
  }
  for (int r = 0; r < R; ++r) {
    const float b = bias ? bias[o0 + r] : 0.f;
    for (int64_t l = 0; l < nb; ++l) {
      float& dst = out[(b0 + l) * out_features + o0 + r];
      dst = (j_begin == 0 ? b : dst) + acc[r][l / L][l % L];
    }
  }
}

}  // namespace bs_lightning::cpu
