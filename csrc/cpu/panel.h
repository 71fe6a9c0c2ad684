// Packing activations into fp32 M-panels and splitting block-rows into nonzero-balanced chunks: the glue
// between the ops (bsr_gemm.cpp, csr_spmm.cpp) and the SIMD micro-kernels (simd.h). CPU-only header.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "simd.h"

namespace sparsekit::cpu {

// dst[t][c][j] = float(src[(t*MT + j) * ld + c]) for c < C, zero for rows past M: a transpose per tile
// (8x8 register transposes for fp32; 16-bit inputs are widened row by row first).
template <typename T>
void pack_panels(Isa isa, const T* src, int64_t ld, int64_t M, int64_t C, int64_t MT, float* dst) {
  const int64_t tiles = (M + MT - 1) / MT;
  at::parallel_for(0, tiles, grain_for(C * MT), [&](int64_t t0, int64_t t1) {
    std::vector<float> wide;
    if constexpr (!std::is_same_v<T, float>) wide.resize(MT * C);
    for (int64_t t = t0; t < t1; ++t) {
      float* d = dst + t * C * MT;
      const int64_t m0 = t * MT, mc = std::min(MT, M - m0);
      const float* s;
      int64_t lds;
      if constexpr (std::is_same_v<T, float>) {
        s = src + m0 * ld;
        lds = ld;
      } else {
        for (int64_t j = 0; j < mc; ++j)
          for (int64_t c = 0; c < C; ++c) wide[j * C + c] = static_cast<float>(src[(m0 + j) * ld + c]);
        s = wide.data();
        lds = C;
      }
      transpose(isa, s, lds, mc, C, nullptr, d, MT);
      if (mc < MT) {
        for (int64_t c = 0; c < C; ++c) std::fill(d + c * MT + mc, d + (c + 1) * MT, 0.f);
      }
    }
  });
}

// y rows [m0, m0 + mc), columns [n0, n0 + cols) = transpose of the fp32 panel out[cols][MT] (+ bias[n0:]).
template <typename T>
void store_panel(Isa isa, const float* out, int64_t MT, int64_t cols, int64_t mc, const float* bias, T* y,
                 int64_t ldy, std::vector<float>& scratch) {
  if constexpr (std::is_same_v<T, float>) {
    transpose(isa, out, MT, cols, mc, bias, y, ldy);
  } else {
    scratch.resize(mc * cols);
    transpose(isa, out, MT, cols, mc, bias, scratch.data(), cols);
    for (int64_t j = 0; j < mc; ++j)
      for (int64_t i = 0; i < cols; ++i) y[j * ldy + i] = static_cast<T>(scratch[j * cols + i]);
  }
}

// The bias widened to fp32 once per call (empty when there is none).
template <typename T>
std::vector<float> bias_f32(const T* bias, int64_t n) {
  std::vector<float> b;
  if (bias) {
    b.resize(n);
    for (int64_t i = 0; i < n; ++i) b[i] = static_cast<float>(bias[i]);
  }
  return b;
}

// Boundaries of `chunks` contiguous row ranges of about equal cost, cost(r) = unit * nnz(r) + row_cost.
inline std::vector<int64_t> balanced_chunks(const int32_t* ptr, int64_t rows, int64_t chunks, int64_t unit,
                                            int64_t row_cost) {
  chunks = std::max<int64_t>(1, std::min(chunks, rows));
  std::vector<int64_t> bounds(chunks + 1, rows);
  bounds[0] = 0;
  const double total = double(ptr[rows]) * unit + double(rows) * row_cost;
  int64_t c = 1;
  for (int64_t r = 0; r < rows && c < chunks; ++r) {
    const double done = double(ptr[r + 1]) * unit + double(r + 1) * row_cost;
    while (c < chunks && done >= total * c / chunks) bounds[c++] = r + 1;
  }
  for (; c < chunks; ++c) bounds[c] = rows;
  return bounds;
}

// How many M-vectors (nv) a register tile spans: enough that rows x vectors fill the accumulator
// registers for blocks of `rows_per_block` rows, but no wider than M needs.
inline int choose_nv(Isa isa, int64_t M, int64_t rows_per_block) {
  const int W = vec_floats(isa), acc = acc_regs(isa);
  const int64_t r = std::max<int64_t>(1, std::min<int64_t>(rows_per_block, acc / 2));
  int nv = 1;
  while (nv < 8 && nv * 2 * r <= acc) nv *= 2;
  nv = std::max(nv, 2);
  const int64_t mv = (M + W - 1) / W;  // vectors M needs
  while (nv > 1 && nv / 2 >= mv) nv /= 2;
  return nv;
}

}  // namespace sparsekit::cpu
