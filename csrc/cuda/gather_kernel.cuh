// SpMV (batch 1) and small-batch SpMM of the balanced format: y[n, o] = sum_j values[o, j] *
// x[n, col(o, j)] (+ bias[o]), col(o, j) = (j / k) * bank_size + indices[o, j].
//
// Design (DESIGN.md section 3: a one-warp-per-row kernel had too few loads in flight):
// - A group of G lanes (G = 1..32, a power of two, chosen on the host) owns one row at a time;
//   a warp holds 32 / G rows. Each lane loads kUnroll chunks of kVec consecutive entries
//   (16 bytes of values + kVec bytes of indices per chunk) into registers before using any,
//   so every lane has kUnroll independent 16-byte loads in flight. Chunk c of pass p for
//   lane g is (p * kUnroll + u) * G + g: the G lanes of a group read consecutive chunks.
// - x is staged once per block in shared memory, transposed to [column][kNB] so one gather
//   returns the kNB batch values of a column (16 bytes for 8 fp16 columns). The grid is
//   persistent (about as many blocks as fit on the GPU), blocks loop over rows, so x is not
//   staged again per row. The first row's loads are issued before staging x. Two register
//   sets of chunks alternate: while one set is summed, the other's loads are in flight (the
//   row's next pass, or the next row's first pass, issued before the reduction and store).
// - The staged x is padded with zeros to (n_banks - 1) * bank_size + 256 columns, so any
//   uint8 index (even a corrupt one) reads inside shared memory.
// - Rows whose start is not 16-byte aligned (row length not a multiple of kVec) are split into
//   a scalar head (up to the next aligned entry), aligned chunks and a scalar tail; head and
//   tail entries (< 2 * kVec per row) are spread over the group's lanes.
// - Bank of entry j: j / k with a multiply-high by a precomputed magic number, once per chunk;
//   inside the chunk the bank advances every k entries.
// - fp32 accumulation; lanes of a group combine with warp shuffles; every (n, row) output with
//   n < n_batch and row < out_features is written exactly once.
// - LSTM mode (kLstm, the fused time step of an LSTM layer): the rows are W_hh's 4H gate
//   rows (PyTorch order i, f, g, o) and x is h. Logical row q maps to gate q % 4 of unit
//   q / 4, so the 4 consecutive groups of a quad (G <= 8) hold the 4 gates of one unit; after
//   the reduction they are shuffled into the quad's first group, which adds the step's input
//   projection, applies the gate nonlinearities and writes h' and c' (no y).
#pragma once

#include "device_utils.cuh"

namespace bs_lightning::cuda {

constexpr int kGatherThreads = 256;
constexpr int kGatherUnroll = 4;  // chunks (16-byte loads) per lane in flight

struct GatherParams {
  const void* x;           // [n_batch, in_features] contiguous
  const void* values;      // [out_features, row_len]
  const uint8_t* indices;  // [out_features, row_len]
  const void* bias;        // [out_features] or nullptr
  void* y;                 // [n_batch, out_features]
  int n_batch;
  int in_features;
  int out_features;
  int row_len;    // n_banks * k
  int k;          // entries per bank
  int bank_size;  // columns per bank
  uint64_t k_magic;
  int xs_cols;     // columns of the staged x (>= in_features, covers any uint8 index)
  int log2_group;  // G = 1 << log2_group lanes per row
  int passes;      // ceil(max aligned chunks per row / (G * kGatherUnroll))
  bool x_vec_ok;   // x rows can be read with 16-byte loads
  // LSTM mode only (out_features = 4 * hidden, in_features = hidden, x = h):
  const void* gates_x;  // [n_batch, 4 * hidden] input projection of this step (+ bias)
  const void* c_in;     // [n_batch, hidden]
  void* h_out;          // [n_batch, hidden]
  void* c_out;          // [n_batch, hidden]
  int hidden;
};

// __expf (~2 ulp + 1.16|v| ulp) is well inside the gates' 1e-5 budget; tanhf stays the
// accurate libdevice one (the build does not use --use_fast_math, which would turn it into
// MUFU.TANH with ~2^-11 relative error).
__device__ __forceinline__ float sigmoid_f(float v) { return 1.f / (1.f + __expf(-v)); }

// acc[n] += w * xs[col][n] for the kNB batch values of one staged column.
template <typename T, int kNB>
__device__ __forceinline__ void gather_fma(const T* xcol, float w, float (&acc)[kNB]) {
  constexpr int kBytes = kNB * static_cast<int>(sizeof(T));
  if constexpr (kBytes <= 16) {
    const Vec<kBytes> v = *reinterpret_cast<const Vec<kBytes>*>(xcol);
    const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
    for (int n = 0; n < kNB; ++n) acc[n] = fmaf(w, to_float(e[n]), acc[n]);
  } else {
    static_assert(kBytes % 16 == 0, "staged x columns are whole 16-byte vectors");
    constexpr int kParts = kBytes / 16;
    constexpr int kPer = 16 / static_cast<int>(sizeof(T));
#pragma unroll
    for (int part = 0; part < kParts; ++part) {
      const uint4 v = reinterpret_cast<const uint4*>(xcol)[part];
      const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
      for (int n = 0; n < kPer; ++n) acc[part * kPer + n] = fmaf(w, to_float(e[n]), acc[part * kPer + n]);
    }
  }
}

// Stages x[n0 : n0 + kNB, :] into xs[col * kNB + n] (zeros for n >= nb_valid and for the
// padding columns in_features..xs_cols). All threads of the block take part.
template <typename T, int kNB>
__device__ void stage_x(T* xs, const T* x, const GatherParams& p, int n0, int nb_valid) {
  constexpr int kV = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte vector
  constexpr int kBatch = 4;                             // loads in flight per thread
  const int tid = threadIdx.x;
  const int in = p.in_features;

  // Padding columns: plain zero stores (at most 255 + bank_size columns).
  const T zero = from_float<T>(0.f);
  for (int i = in * kNB + tid; i < p.xs_cols * kNB; i += kGatherThreads) xs[i] = zero;

  if constexpr (kNB > 1) {
    // One thread per column: it reads the column's kNB batch values (consecutive lanes read
    // consecutive columns of a row: coalesced) and writes them as one contiguous chunk, so
    // consecutive lanes store consecutive chunks and no two lanes of a phase share a bank.
    // (Transposing a 16-byte vector per thread put lanes 16 * kNB bytes apart: 8-32-way
    // conflicts.) Scalar loads also need no alignment of x.
    constexpr int kBytes = kNB * static_cast<int>(sizeof(T));
    constexpr int kParts = kBytes >= 16 ? kBytes / 16 : 1;
    for (int c = tid; c < in; c += kGatherThreads) {
      uint4 chunk[kParts];  // the column's kNB values, in registers
      T* e = reinterpret_cast<T*>(chunk);
#pragma unroll
      for (int n = 0; n < kNB; ++n)
        e[n] = n < nb_valid ? x[static_cast<size_t>(n0 + n) * in + c] : zero;
      T* dst = xs + static_cast<size_t>(c) * kNB;
      if constexpr (kBytes >= 16) {
#pragma unroll
        for (int part = 0; part < kParts; ++part) reinterpret_cast<uint4*>(dst)[part] = chunk[part];
      } else if constexpr (kBytes == 8) {
        *reinterpret_cast<uint2*>(dst) = *reinterpret_cast<const uint2*>(chunk);
      } else if constexpr (kBytes == 4) {
        *reinterpret_cast<uint32_t*>(dst) = *reinterpret_cast<const uint32_t*>(chunk);
      } else {
#pragma unroll
        for (int n = 0; n < kNB; ++n) dst[n] = e[n];
      }
    }
  } else if (p.x_vec_ok) {
    const int total = in / kV;  // 16-byte vectors of the one batch row
    for (int base = tid; base < total; base += kGatherThreads * kBatch) {
      uint4 v[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int t = base + u * kGatherThreads;
        v[u] = t < total && nb_valid > 0
                   ? load_ro<uint4>(x + static_cast<size_t>(n0) * in + t * kV)
                   : zero_vec<uint4>();
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int t = base + u * kGatherThreads;
        if (t < total) *reinterpret_cast<uint4*>(xs + t * kV) = v[u];
      }
    }
  } else {
    for (int c = tid; c < in; c += kGatherThreads)
      xs[c] = nb_valid > 0 ? x[static_cast<size_t>(n0) * in + c] : zero;
  }
}

// Where the aligned chunks of a row start and how many there are.
struct RowSplit {
  int head;     // scalar entries [0, head) before the first kVec-aligned entry
  int n_full;   // aligned chunks of kVec entries starting at entry `head`
  int tail0;    // first entry of the scalar tail [tail0, row_len)
};

template <int kVec>
__device__ __forceinline__ RowSplit split_row(int row, int row_len) {
  RowSplit s;
  if constexpr (kVec == 1) {
    s.head = 0;
    s.n_full = row_len;
    s.tail0 = row_len;
  } else {
    // Element offset of the row start modulo kVec; base pointers are 16-byte aligned.
    const int mis = static_cast<int>((static_cast<uint64_t>(row) * row_len) % kVec);
    s.head = min((kVec - mis) % kVec, row_len);
    s.n_full = (row_len - s.head) / kVec;
    s.tail0 = s.head + s.n_full * kVec;
  }
  return s;
}

template <typename T, int kVec, int kNB, bool kLstm>
__global__ void __launch_bounds__(kGatherThreads)
    balanced_gather_kernel(const GatherParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* xs = reinterpret_cast<T*>(smem_raw);  // [xs_cols][kNB]

  using VVal = Vec<kVec * static_cast<int>(sizeof(T))>;
  using VIdx = Vec<kVec>;

  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ values = static_cast<const T*>(p.values);
  const uint8_t* __restrict__ indices = p.indices;
  const T* __restrict__ bias = static_cast<const T*>(p.bias);
  T* __restrict__ y = static_cast<T*>(p.y);

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int G = 1 << p.log2_group;
  const int g = lane & (G - 1);              // lane within the row's group
  const int group = lane >> p.log2_group;    // group within the warp
  const int rows_per_warp = 32 >> p.log2_group;
  constexpr int kWarps = kGatherThreads / 32;
  const int out = p.out_features;
  const int R = p.row_len;
  const uint32_t k = static_cast<uint32_t>(p.k);
  const int B = p.bank_size;

  const int n0 = blockIdx.y * kNB;
  const int nb_valid = min(kNB, p.n_batch - n0);

  // Warp-uniform row base: every lane of a warp runs the same number of iterations, so the
  // shuffles below always have the whole warp.
  int row_base = (blockIdx.x * kWarps + warp) * rows_per_warp;
  const int row_stride = gridDim.x * kWarps * rows_per_warp;
  // The next base in 64 bits, clamped to `out`: base + stride can pass INT32_MAX on tall
  // matrices (the host checks out + 32 fits an int, so `base + group` always does).
  auto next_base = [&](int base) {
    return static_cast<int>(
        min(static_cast<long long>(base) + row_stride, static_cast<long long>(out)));
  };
  // Logical row q -> weight row (LSTM mode: gate q % 4 of unit q / 4). Rows past the end
  // stay past the end, so `< out` keeps meaning "valid".
  auto weight_row = [&](int q) {
    if constexpr (kLstm) {
      return q < out ? (q & 3) * p.hidden + (q >> 2) : q;
    } else {
      return q;
    }
  };

  // Two register sets: while one set's chunks are summed, the other set's loads are in
  // flight (pass p + 1 of this row, or pass 0 of the next row).
  VVal wv_a[kGatherUnroll], wv_b[kGatherUnroll];
  VIdx iv_a[kGatherUnroll], iv_b[kGatherUnroll];

  auto load_pass = [&](VVal(&wv)[kGatherUnroll], VIdx(&iv)[kGatherUnroll], int row, int pass) {
    const bool ok = row < out;
    const RowSplit s = split_row<kVec>(ok ? row : 0, R);
    const size_t row_off = static_cast<size_t>(ok ? row : 0) * R + s.head;
#pragma unroll
    for (int u = 0; u < kGatherUnroll; ++u) {
      const int c = (pass * kGatherUnroll + u) * G + g;
      if (ok && c < s.n_full) {
        const size_t e = row_off + static_cast<size_t>(c) * kVec;
        wv[u] = load_ro<VVal>(values + e);
        iv[u] = load_ro<VIdx>(indices + e);
      }
    }
  };

  // Sums the chunks a load_pass(wv, iv, row, pass) brought in (same predicates).
  auto compute_pass = [&](const VVal(&wv)[kGatherUnroll], const VIdx(&iv)[kGatherUnroll],
                          int row, int pass, float(&acc)[kNB]) {
    const RowSplit s = split_row<kVec>(row, R);
#pragma unroll
    for (int u = 0; u < kGatherUnroll; ++u) {
      const int c = (pass * kGatherUnroll + u) * G + g;
      if (c < s.n_full) {
        const uint32_t j0 = static_cast<uint32_t>(s.head + c * kVec);
        uint32_t bank = div_by_k(j0, p.k_magic);
        uint32_t r = j0 - bank * k;  // position inside the bank
        int col_base = static_cast<int>(bank) * B;
        const T* w = reinterpret_cast<const T*>(&wv[u]);
        const uint8_t* idx = reinterpret_cast<const uint8_t*>(&iv[u]);
#pragma unroll
        for (int i = 0; i < kVec; ++i) {
          gather_fma<T, kNB>(xs + (col_base + idx[i]) * kNB, to_float(w[i]), acc);
          if (++r == k) {
            r = 0;
            col_base += B;
          }
        }
      }
    }
  };

  // Scalar head and tail entries of a row (only when rows are not kVec-aligned).
  auto compute_edges = [&](int row, float(&acc)[kNB]) {
    const RowSplit s = split_row<kVec>(row, R);
    const int n_edge = s.head + (R - s.tail0);
    const size_t row_off = static_cast<size_t>(row) * R;
    for (int e = g; e < n_edge; e += G) {
      const int j = e < s.head ? e : s.tail0 + (e - s.head);
      const float w = to_float(values[row_off + j]);
      const int col = static_cast<int>(div_by_k(static_cast<uint32_t>(j), p.k_magic)) * B +
                      indices[row_off + j];
      gather_fma<T, kNB>(xs + col * kNB, w, acc);
    }
  };

  // First row's loads go out before x is staged, so the two overlap.
  load_pass(wv_a, iv_a, weight_row(row_base + group), 0);
  stage_x<T, kNB>(xs, x, p, n0, nb_valid);
  __syncthreads();

  // Reduces a row's partial sums over its group and writes the row (LSTM mode: the gates of
  // its unit). `base` is the warp's row base; warp-uniform callers only (shuffles).
  auto finish_row = [&](int base, float(&acc)[kNB]) {
    const int row = weight_row(base + group);
    const bool row_ok = row < out;
#pragma unroll
    for (int n = 0; n < kNB; ++n) {
      for (int off = G >> 1; off > 0; off >>= 1)
        acc[n] += __shfl_xor_sync(0xffffffffu, acc[n], off);
    }
    if constexpr (kLstm) {
      // Gate sums of this quad's unit, from the quad's 4 groups (same lane g in each).
      const int quad_lane = (lane & ~(4 * G - 1)) + g;
      const bool cell_lane = (group & 3) == 0 && row_ok;
      const int unit = (base + group) >> 2;
      const T* gx = static_cast<const T*>(p.gates_x);
      const T* c_in = static_cast<const T*>(p.c_in);
#pragma unroll
      for (int n = 0; n < kNB; ++n) {
        const float gi = __shfl_sync(0xffffffffu, acc[n], quad_lane);
        const float gf = __shfl_sync(0xffffffffu, acc[n], quad_lane + G);
        const float gg = __shfl_sync(0xffffffffu, acc[n], quad_lane + 2 * G);
        const float go = __shfl_sync(0xffffffffu, acc[n], quad_lane + 3 * G);
        if (cell_lane && (n & (G - 1)) == g && n < nb_valid) {
          const size_t gate_off = static_cast<size_t>(n0 + n) * 4 * p.hidden + unit;
          const size_t state = static_cast<size_t>(n0 + n) * p.hidden + unit;
          const float i = sigmoid_f(gi + to_float(gx[gate_off]));
          const float f = sigmoid_f(gf + to_float(gx[gate_off + p.hidden]));
          const float c_new = f * to_float(c_in[state]) +
                              i * tanhf(gg + to_float(gx[gate_off + 2 * p.hidden]));
          const float o = sigmoid_f(go + to_float(gx[gate_off + 3 * p.hidden]));
          static_cast<T*>(p.c_out)[state] = from_float<T>(c_new);
          static_cast<T*>(p.h_out)[state] = from_float<T>(o * tanhf(c_new));
        }
      }
    } else if (row_ok) {
      const float b = bias != nullptr ? to_float(bias[row]) : 0.f;
      // Lane g stores batch columns n with n % G == g (compile-time register indices).
#pragma unroll
      for (int n = 0; n < kNB; ++n) {
        if ((n & (G - 1)) == g && n < nb_valid)
          y[static_cast<size_t>(n0 + n) * out + row] = from_float<T>(acc[n] + b);
      }
    }
  };

  if (p.passes == 1) {
    // One pass per row (every row up to kGatherUnroll * G * kVec entries): the two register
    // sets alternate between rows, so while one row is summed the next row's loads are in
    // flight (one set would leave each warp two DRAM round trips back to back).
    // Sums and writes the one-pass row at warp row base `base` from a loaded register set.
    auto one_pass_row = [&](const VVal(&wv)[kGatherUnroll], const VIdx(&iv)[kGatherUnroll],
                            int base) {
      const int row = weight_row(base + group);
      float acc[kNB];
#pragma unroll
      for (int n = 0; n < kNB; ++n) acc[n] = 0.f;
      if (row < out) {
        compute_pass(wv, iv, row, 0, acc);
        compute_edges(row, acc);
      }
      finish_row(base, acc);
    };
    while (row_base < out) {
      const int base_b = next_base(row_base);
      load_pass(wv_b, iv_b, weight_row(base_b + group), 0);
      one_pass_row(wv_a, iv_a, row_base);
      if (base_b >= out) break;  // warp-uniform
      const int base_a = next_base(base_b);
      load_pass(wv_a, iv_a, weight_row(base_a + group), 0);
      one_pass_row(wv_b, iv_b, base_b);
      row_base = base_a;
    }
    return;
  }

  for (; row_base < out; row_base = next_base(row_base)) {
    const int row = weight_row(row_base + group);
    const bool row_ok = row < out;
    const int next_row = weight_row(next_base(row_base) + group);
    float acc[kNB];
#pragma unroll
    for (int n = 0; n < kNB; ++n) acc[n] = 0.f;

    // Set a holds the even passes, set b the odd ones. Set a's pass 0 was loaded before.
    for (int pass = 0; pass < p.passes; pass += 2) {
      const bool has_b = pass + 1 < p.passes;
      if (has_b) load_pass(wv_b, iv_b, row, pass + 1);
      if (row_ok) compute_pass(wv_a, iv_a, row, pass, acc);
      // Set a is free again: this row's pass + 2, or the next row's pass 0.
      if (pass + 2 < p.passes) {
        load_pass(wv_a, iv_a, row, pass + 2);
      } else {
        load_pass(wv_a, iv_a, next_row, 0);
      }
      if (has_b && row_ok) compute_pass(wv_b, iv_b, row, pass + 1, acc);
    }
    if (row_ok) compute_edges(row, acc);
    finish_row(row_base, acc);
  }
}

using GatherKernel = void (*)(GatherParams);

// The kernel for dtype T: 16-byte chunks when `vec` (base pointers aligned), else scalar
// loads; kNB = nb batch columns per block (1, 2, 4 or 8; LSTM mode: 1 or 8). Each dtype's
// kernels are compiled in their own translation unit (gather_<dtype>.cu) so the build runs
// them in parallel.
template <typename T>
GatherKernel gather_kernel_for(bool vec, int nb, bool lstm);
template <>
GatherKernel gather_kernel_for<float>(bool vec, int nb, bool lstm);
template <>
GatherKernel gather_kernel_for<__half>(bool vec, int nb, bool lstm);
template <>
GatherKernel gather_kernel_for<__nv_bfloat16>(bool vec, int nb, bool lstm);

// Definition used by gather_<dtype>.cu.
template <typename T>
GatherKernel select_gather_kernel(bool vec, int nb, bool lstm) {
  constexpr int kV = 16 / static_cast<int>(sizeof(T));
  if (lstm) {
    if (nb == 1) return vec ? balanced_gather_kernel<T, kV, 1, true> : balanced_gather_kernel<T, 1, 1, true>;
    return vec ? balanced_gather_kernel<T, kV, 8, true> : balanced_gather_kernel<T, 1, 8, true>;
  }
  switch (nb) {
    case 1:
      return vec ? balanced_gather_kernel<T, kV, 1, false> : balanced_gather_kernel<T, 1, 1, false>;
    case 2:
      return vec ? balanced_gather_kernel<T, kV, 2, false> : balanced_gather_kernel<T, 1, 2, false>;
    case 4:
      return vec ? balanced_gather_kernel<T, kV, 4, false> : balanced_gather_kernel<T, 1, 4, false>;
    default:
      return vec ? balanced_gather_kernel<T, kV, 8, false> : balanced_gather_kernel<T, 1, 8, false>;
  }
}

}  // namespace bs_lightning::cuda
