// sparsekit::rnn_cell: the pointwise part of one recurrent step (LSTM / GRU / RNN gates) in one pass.
//
// A LinearRecurrent step is a small product h @ W_hh^T (sparse) and ~10 elementwise torch ops on [batch, gates *
// hidden] (sigmoid, tanh, adds, products), each a few microseconds of dispatch for a few thousand elements; with
// a 90%-sparse W_hh those ops took more time than the product. This kernel reads the step's input projection gi,
// the recurrent projection gh and the state once and writes the new state.
//
// exp is a vectorizable polynomial (Cephes' expf: range reduction by ln 2, degree-5 polynomial, 2^n from the
// exponent bits), so the loops compile to AVX2 (under `#pragma GCC target`, chosen at run time like the
// micro-kernels) or to the portable vector width; sigmoid(x) = 1 / (1 + exp(-x)), tanh(x) = 2 sigmoid(2x) - 1
// (its Taylor series near 0, where that form loses relative precision). fp32 and bf16 (computed in fp32, rounded to
// nearest even once); float64 / float16 through std::exp / std::tanh. Modes: 0 LSTM, 1 GRU, 2 RNN_TANH,
// 3 RNN_RELU (torch's gate orders: i f g o, r z n).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "checks.h"
#include "simd.h"

namespace sparsekit::cpu {
namespace {

enum Mode : int64_t { kLstm = 0, kGru = 1, kRnnTanh = 2, kRnnRelu = 3 };

// cells per parallel chunk: ~4.6 ns each (LSTM) on one AVX2 core, so a chunk is ~35 us, above the cost of waking
// threads (measured, 2 cores: 16 x 1024 LSTM cells 130 -> 72 us on two threads; 8 x 1024 split in two chunks of
// 4 rows gained nothing, so a batch of 8 at hidden 1024 stays on one thread)
constexpr int64_t kParallelCells = 1 << 13;

inline float bf16_to_float(uint16_t v) {
  const uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even; NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

namespace portable {  // 4 lanes: SSE2 on x86-64, NEON on arm64
typedef float vf __attribute__((vector_size(16)));
typedef int32_t vi __attribute__((vector_size(16)));
constexpr int kW = 4;
#include "rnn_cell.inc"
}  // namespace portable

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
typedef float vf __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));
constexpr int kW = 8;
#include "rnn_cell.inc"
}  // namespace avx2
#pragma GCC pop_options
#define SPARSEKIT_RNN_AVX2 1
#else
#define SPARSEKIT_RNN_AVX2 0
#endif

// float64 and float16 (any ISA): the same step with std::exp / std::tanh, in double for float64 and in float
// for float16 (rounded once), row by row
template <typename T, typename Acc>
void row_exact(int64_t mode, int64_t H, const T* gi, const T* gh, const T* h, const T* c, T* h_out, T* c_out) {
  auto sig = [](Acc x) { return Acc(1) / (Acc(1) + std::exp(-x)); };
  auto pre = [&](int64_t i) { return Acc(gi[i]) + Acc(gh[i]); };
  for (int64_t j = 0; j < H; ++j) {
    if (mode == kLstm) {
      const Acc cn = sig(pre(H + j)) * Acc(c[j]) + sig(pre(j)) * std::tanh(pre(2 * H + j));
      c_out[j] = T(cn);
      h_out[j] = T(sig(pre(3 * H + j)) * std::tanh(cn));
    } else if (mode == kGru) {
      const Acc r = sig(pre(j)), z = sig(pre(H + j));
      const Acc cand = std::tanh(Acc(gi[2 * H + j]) + r * Acc(gh[2 * H + j]));
      h_out[j] = T(cand + z * (Acc(h[j]) - cand));
    } else {
      const Acc x = pre(j);
      h_out[j] = T(mode == kRnnTanh ? std::tanh(x) : (x <= Acc(0) ? Acc(0) : x));  // (NaN stays NaN)
    }
  }
}

using RowFn = void (*)(int64_t, int64_t, const float*, const float*, const float*, const float*, float*, float*);

RowFn row_fn() {
#if SPARSEKIT_RNN_AVX2
  if (active_isa() != Isa::kScalar) return &avx2::row;
#endif
  return &portable::row;
}

void check_state(const char* name, const at::Tensor& t, const at::Tensor& ref, int64_t rows, int64_t hidden) {
  check_tensor("rnn_cell", t, name, 2);
  check_same_dtype("rnn_cell", t, name, ref, "gi");
  TORCH_CHECK(t.size(0) == rows && t.size(1) == hidden, "rnn_cell: ", name, " must have shape [", rows, ", ",
              hidden, "], got ", t.sizes());
}

template <typename T, typename Acc>
void run_exact(int64_t mode, int64_t rows, int64_t H, int64_t G, int64_t grain, const at::Tensor& gi,
               const at::Tensor& gh, const at::Tensor& h, const at::Tensor& c, at::Tensor& h_out, at::Tensor& c_out) {
  const bool lstm = mode == kLstm;
  const T *pgi = gi.const_data_ptr<T>(), *pgh = gh.const_data_ptr<T>(), *ph = lstm ? nullptr : h.const_data_ptr<T>(),
          *pc = lstm ? c.const_data_ptr<T>() : nullptr;
  T *pho = h_out.mutable_data_ptr<T>(), *pco = lstm ? c_out.mutable_data_ptr<T>() : nullptr;
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      row_exact<T, Acc>(mode, H, pgi + r * G, pgh + r * G, lstm ? nullptr : ph + r * H, lstm ? pc + r * H : nullptr,
                        pho + r * H, lstm ? pco + r * H : nullptr);
  });
}

std::tuple<at::Tensor, at::Tensor> rnn_cell(const at::Tensor& gi, const at::Tensor& gh, const at::Tensor& h,
                                            const std::optional<at::Tensor>& c_opt, int64_t mode) {
  TORCH_CHECK(mode >= kLstm && mode <= kRnnRelu, "rnn_cell: mode must be 0 (LSTM), 1 (GRU), 2 (RNN_TANH) or 3 "
              "(RNN_RELU), got ", mode);
  check_tensor("rnn_cell", gi, "gi", 2);
  const auto dt = gi.scalar_type();
  check_floating("rnn_cell", gi, "gi");
  const int64_t rows = gi.size(0), gates = mode == kLstm ? 4 : mode == kGru ? 3 : 1;
  TORCH_CHECK(gi.size(1) % gates == 0, "rnn_cell: gi.size(1) must be a multiple of the gates (", gates, "), got ",
              gi.size(1));
  const int64_t H = gi.size(1) / gates;
  check_state("gh", gh, gi, rows, gates * H);
  const bool lstm = mode == kLstm;
  if (!lstm) check_state("h", h, gi, rows, H);  // (an LSTM's step reads c only; its h may be a projection)
  TORCH_CHECK(lstm == (c_opt.has_value() && c_opt->defined()), "rnn_cell: c must be given for an LSTM (mode 0) "
              "and only for it");
  at::Tensor c;
  if (lstm) {
    c = *c_opt;
    check_state("c", c, gi, rows, H);
  }
  const at::Tensor gi_c = gi.contiguous(), gh_c = gh.contiguous(), h_c = lstm ? h : h.contiguous();
  const at::Tensor c_c = lstm ? c.contiguous() : c;
  at::Tensor h_out = at::empty({rows, H}, gi.options());
  at::Tensor c_out = lstm ? at::empty({rows, H}, gi.options()) : at::empty({0}, gi.options());
  if (rows == 0 || H == 0) return {h_out, c_out};
  const RowFn fn = row_fn();
  const int64_t G = gates * H;
  const int64_t grain = std::max<int64_t>(1, kParallelCells / H);  // rows per thread
  if (dt == at::kFloat) {
    const float *pgi = gi_c.const_data_ptr<float>(), *pgh = gh_c.const_data_ptr<float>(),
                *ph = lstm ? nullptr : h_c.const_data_ptr<float>(), *pc = lstm ? c_c.const_data_ptr<float>() : nullptr;
    float *pho = h_out.mutable_data_ptr<float>(), *pco = lstm ? c_out.mutable_data_ptr<float>() : nullptr;
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        fn(mode, H, pgi + r * G, pgh + r * G, lstm ? nullptr : ph + r * H, lstm ? pc + r * H : nullptr, pho + r * H,
           lstm ? pco + r * H : nullptr);
    });
    return {h_out, c_out};
  }
  if (dt == at::kDouble || dt == at::kHalf) {
    AT_DISPATCH_SWITCH(dt, "rnn_cell", AT_DISPATCH_CASE(at::kDouble, [&] {
      run_exact<scalar_t, double>(mode, rows, H, G, grain, gi_c, gh_c, h_c, c_c, h_out, c_out);
    }) AT_DISPATCH_CASE(at::kHalf, [&] {
      run_exact<scalar_t, float>(mode, rows, H, G, grain, gi_c, gh_c, h_c, c_c, h_out, c_out);
    }));
    return {h_out, c_out};
  }
  // bf16: each row widened into fp32 scratch, computed, rounded once
  const uint16_t *pgi = reinterpret_cast<const uint16_t*>(gi_c.const_data_ptr<at::BFloat16>()),
                 *pgh = reinterpret_cast<const uint16_t*>(gh_c.const_data_ptr<at::BFloat16>()),
                 *ph = lstm ? nullptr : reinterpret_cast<const uint16_t*>(h_c.const_data_ptr<at::BFloat16>()),
                 *pc = lstm ? reinterpret_cast<const uint16_t*>(c_c.const_data_ptr<at::BFloat16>()) : nullptr;
  uint16_t *pho = reinterpret_cast<uint16_t*>(h_out.mutable_data_ptr<at::BFloat16>()),
           *pco = lstm ? reinterpret_cast<uint16_t*>(c_out.mutable_data_ptr<at::BFloat16>()) : nullptr;
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(2 * G + 4 * H);
    float *fgi = buf.data(), *fgh = fgi + G, *fh = fgh + G, *fc = fh + H, *fho = fc + H, *fco = fho + H;
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t k = 0; k < G; ++k) {
        fgi[k] = bf16_to_float(pgi[r * G + k]);
        fgh[k] = bf16_to_float(pgh[r * G + k]);
      }
      for (int64_t k = 0; k < H; ++k) {
        fh[k] = lstm ? 0.f : bf16_to_float(ph[r * H + k]);
        fc[k] = lstm ? bf16_to_float(pc[r * H + k]) : 0.f;
      }
      fn(mode, H, fgi, fgh, fh, lstm ? fc : nullptr, fho, lstm ? fco : nullptr);
      for (int64_t k = 0; k < H; ++k) {
        pho[r * H + k] = float_to_bf16(fho[k]);
        if (lstm) pco[r * H + k] = float_to_bf16(fco[k]);
      }
    }
  });
  return {h_out, c_out};
}

}  // namespace
}  // namespace sparsekit::cpu

TORCH_LIBRARY_IMPL(sparsekit, CPU, m) { m.impl("rnn_cell", &sparsekit::cpu::rnn_cell); }
