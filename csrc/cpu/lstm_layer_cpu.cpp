// CPU implementation of bs_lightning::balanced_lstm_layer (schema in csrc/ops.cpp): the
// recurrence of one LSTM layer in one direction, all time steps in one call.
//
//   gates_x [T, B, 4H]  x_t W_ih^T + b_ih + b_hh for every step (one product beforehand),
//   h0, c0  [B, H],     values/indices: W_hh [4H, H] in the tile layout of pack_tiles.
// Per step: gates = gates_x[t] + h W_hh^T (tile kernel), then PyTorch's gate order i, f, g, o:
//   c = sigmoid(f) * c + sigmoid(i) * tanh(g),  h = sigmoid(o) * tanh(c).
// A Python loop pays a dozen op dispatches per step, more than the sparse product itself
// for hidden sizes of a few hundred; here a step is one product and one pass over the gates.
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "balanced_linear.h"
#include "cpu/tiled_driver.h"

namespace bs_lightning::cpu {
namespace {

// Products with fewer multiply-adds than this per thread run on the calling thread: the
// recurrent matrix of a small layer is done before a thread pool would wake up.
constexpr int64_t kProductsPerThread = int64_t{1} << 16;

#if defined(__AVX512F__)
// exp(x) = 2^n * 2^f with n = round(x log2 e), |f| <= 1/2; 2^f by its Taylor series to
// degree 7 (relative error < 1e-8, below fp32 rounding). Inputs clamped to +-88 (fp32 range).
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-88.f)), _mm512_set1_ps(88.f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.6931471805599453f));
  constexpr float c[] = {1.f / 5040, 1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f};
  __m512 p = _mm512_set1_ps(c[0]);
#pragma GCC unroll 8
  for (int i = 1; i < 8; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c[i]));
  return _mm512_scalef_ps(p, n);
}
inline __m512 sigmoid16(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.f);
  return _mm512_div_ps(one, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}
inline __m512 tanh16(__m512 x) {  // 1 - 2 / (1 + exp(2x))
  const __m512 one = _mm512_set1_ps(1.f);
  return _mm512_sub_ps(
      one, _mm512_div_ps(_mm512_set1_ps(2.f), _mm512_add_ps(one, exp16(_mm512_add_ps(x, x)))));
}
#endif

inline float sigmoid1(float x) { return 1.f / (1.f + std::exp(-x)); }

// One step's gate arithmetic for B rows: gx, gh [B, 4H]; h, c [B, H] updated; h also
// written to out_t [B, H].
void lstm_gates(const float* gx, const float* gh, float* h, float* c, float* out_t, int64_t B,
                int64_t H) {
  for (int64_t b = 0; b < B; ++b) {
    const float* x = gx + b * 4 * H;
    const float* r = gh + b * 4 * H;
    float* hb = h + b * H;
    float* cb = c + b * H;
    int64_t j = 0;
#if defined(__AVX512F__)
    for (; j < H; j += 16) {
      const __mmask16 m = prefix_mask(H - j);
      auto gate = [&](int64_t q) {
        return _mm512_add_ps(_mm512_maskz_loadu_ps(m, x + q * H + j),
                             _mm512_maskz_loadu_ps(m, r + q * H + j));
      };
      const __m512 i = sigmoid16(gate(0)), f = sigmoid16(gate(1));
      const __m512 g = tanh16(gate(2)), o = sigmoid16(gate(3));
      const __m512 cn = _mm512_fmadd_ps(f, _mm512_maskz_loadu_ps(m, cb + j), _mm512_mul_ps(i, g));
      const __m512 hn = _mm512_mul_ps(o, tanh16(cn));
      _mm512_mask_storeu_ps(cb + j, m, cn);
      _mm512_mask_storeu_ps(hb + j, m, hn);
      _mm512_mask_storeu_ps(out_t + b * H + j, m, hn);
    }
#endif
    for (; j < H; ++j) {
      const float i = sigmoid1(x[j] + r[j]), f = sigmoid1(x[H + j] + r[H + j]);
      const float g = std::tanh(x[2 * H + j] + r[2 * H + j]);
      const float o = sigmoid1(x[3 * H + j] + r[3 * H + j]);
      cb[j] = f * cb[j] + i * g;
      hb[j] = o * std::tanh(cb[j]);
      out_t[b * H + j] = hb[j];
    }
  }
}

void check_lstm_inputs(const at::Tensor& gates_x, const at::Tensor& h0, const at::Tensor& c0,
                       const at::Tensor& values, const at::Tensor& indices, int64_t bank_size) {
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"gates_x", gates_x},
                                {"h0", h0}, {"c0", c0}, {"values", values}}) {
    TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, "balanced_lstm_layer: ", name,
                     " must be torch.float32, got ", dtype_name(t.scalar_type()));
  }
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kByte,
                   "balanced_lstm_layer: indices must be torch.uint8, got ",
                   dtype_name(indices.scalar_type()));
  TORCH_CHECK_VALUE(h0.dim() == 2 && c0.sizes() == h0.sizes(),
                    "balanced_lstm_layer: h0 and c0 must both be [B, H], got ", h0.sizes(),
                    " and ", c0.sizes());
  const int64_t B = h0.size(0), H = h0.size(1);
  TORCH_CHECK_VALUE(gates_x.dim() == 3 && gates_x.size(1) == B && gates_x.size(2) == 4 * H,
                    "balanced_lstm_layer: gates_x must be [T, B=", B, ", 4H=", 4 * H, "], got ",
                    gates_x.sizes());
  TORCH_CHECK_VALUE(bank_size >= 1 && bank_size <= kMaxTiledBank,
                    "balanced_lstm_layer: bank_size must be in 1..", kMaxTiledBank, ", got ",
                    bank_size);
  const int64_t n_tiles = ceil_div(4 * H, kTileRows), n_banks = ceil_div(H, bank_size);
  TORCH_CHECK_VALUE(values.dim() == 3 && values.size(0) == n_tiles &&
                        values.size(2) == kTileRows && values.size(1) > 0 &&
                        values.size(1) % n_banks == 0 && values.size(1) / n_banks <= bank_size,
                    "balanced_lstm_layer: values must be W_hh [4H, H] in the tile layout, [",
                    n_tiles, ", ceil(H / bank_size) * k, 16], got ", values.sizes());
  TORCH_CHECK_VALUE(indices.sizes() == values.sizes(), "balanced_lstm_layer: indices shape ",
                    indices.sizes(), " must equal values shape ", values.sizes());
  for (const at::Tensor* t : {&gates_x, &h0, &c0, &values, &indices}) {
    TORCH_CHECK_VALUE(t->device().is_cpu(), "balanced_lstm_layer: all tensors must be on the CPU");
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> balanced_lstm_layer_cpu(
    const at::Tensor& gates_x, const at::Tensor& h0, const at::Tensor& c0,
    const at::Tensor& values, const at::Tensor& indices, int64_t bank_size, bool reverse) {
  check_lstm_inputs(gates_x, h0, c0, values, indices, bank_size);
  const int64_t T = gates_x.size(0), B = h0.size(0), H = h0.size(1);
  const at::Tensor gx = gates_x.contiguous();
  const at::Tensor v = values.contiguous(), idx = indices.contiguous();
  at::Tensor h = h0.contiguous().clone(), c = c0.contiguous().clone();
  at::Tensor out = at::empty({T, B, H}, gates_x.options());
  at::Tensor gh = at::empty({B, 4 * H}, gates_x.options());  // h W_hh^T of the step
  const int64_t width = v.size(1);
  const TiledArgs a{h.const_data_ptr<float>(),
                    B,
                    H,
                    4 * H,
                    v.size(0),
                    width,
                    width / ceil_div(H, bank_size),
                    bank_size,
                    nullptr};
  const int64_t grain =
      std::max<int64_t>(4, kProductsPerThread / std::max<int64_t>(1, width * kTileRows * B));
  const float* vptr = v.const_data_ptr<float>();
  const uint8_t* iptr = idx.const_data_ptr<uint8_t>();
  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = reverse ? T - 1 - s : s;
    run_tiled<float>(a, vptr, iptr, gh.mutable_data_ptr<float>(), grain);
    lstm_gates(gx.const_data_ptr<float>() + t * B * 4 * H, gh.const_data_ptr<float>(),
               h.mutable_data_ptr<float>(), c.mutable_data_ptr<float>(),
               out.mutable_data_ptr<float>() + t * B * H, B, H);
  }
  return {out, h, c};
}

}  // namespace bs_lightning::cpu

TORCH_LIBRARY_IMPL(bs_lightning, CPU, m) {
  m.impl("balanced_lstm_layer", &bs_lightning::cpu::balanced_lstm_layer_cpu);
}
