// CPU kernels for the CSR ops (schemas and semantics in csrc/ops.cpp):
//   csr_mm     y  = x @ W^T + bias    parallel over (M tile, row of W): each task owns a tile of y
//   csr_mm_t   dx = dy @ W            the same kernel over W^T (a CSC copy built per call): each task owns
//                                     a tile of dx, no atomics; tiny M scatters rows of W instead
//   csr_sddmm  dW = dy^T @ x on W's entries, parallel over rows of W: one contiguous dot over M per entry
// col_indices is int16 (K <= 32768) or int32: the kernels are templated on the index type.
// 16-bit value types accumulate in fp32 (at::opmath_type).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "csr.h"
#include "tiles.h"
#include "panel.h"
#include "simd.h"
#include "tap_tiling.h"
#include "values.h"

namespace {

using namespace sparsekit::cpu;

// csr_mm_t below this M scatters instead of transposing W (measured when csr_mm ran M <= 8 as gather dots; the
// transposed product now takes the panel kernel from M = 2, which may move the best cut-off)
constexpr int64_t kScatterMaxM = 8;

// ------------------------------------------------------------------------------------------- checks
void check_indices(const char* op, const at::Tensor& crow, const at::Tensor& col) {
  check_tensor(op, crow, "crow_indices", 1);
  TORCH_CHECK(crow.scalar_type() == at::kInt, op, ": crow_indices must have dtype torch.int32, got ",
              dtype_name(crow.scalar_type()));
  TORCH_CHECK(crow.is_contiguous(), op, ": crow_indices must be contiguous");
  check_tensor(op, col, "col_indices", 1);
  TORCH_CHECK(col.scalar_type() == at::kShort || col.scalar_type() == at::kInt, op,
              ": col_indices must have dtype torch.int16 or torch.int32, got ", dtype_name(col.scalar_type()));
  TORCH_CHECK(col.is_contiguous(), op, ": col_indices must be contiguous");
}

// One value per col index.
void check_nnz(const char* op, const at::Tensor& col, const at::Tensor& values) {
  TORCH_CHECK(col.numel() == values.numel(), op, ": col_indices has ", col.numel(), " entries but values has ",
              values.numel());
}

// The checks of csr_mm and csr_mm_xt (act = x [M, K] or xt [B, K, M], W [n, K]): the dense operand and 1-D
// values (check_operands), the index tensors and their sizes. The pattern is checked per index type
// (check_structure), the bias by each op.
void check_csr_mm_args(const char* op, const at::Tensor& act, const char* act_name, int64_t act_dim,
                       const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values, int64_t n) {
  check_operands(op, act, act_name, act_dim, values, 1);
  check_indices(op, crow, col);
  TORCH_CHECK(n >= 0, op, ": n must be non-negative, got ", n);
  TORCH_CHECK(crow.numel() == n + 1, op, ": crow_indices must have n + 1 = ", n + 1, " entries, got ", crow.numel());
  check_nnz(op, col, values);
}

// Rejects index data that would read out of bounds. O(N + nnz), small next to the product.
template <typename I>
void check_structure(const char* op, const int32_t* crow, const I* col, int64_t rows, int64_t nnz, int64_t cols) {
  TORCH_CHECK(crow[0] == 0 && crow[rows] == nnz, op, ": crow_indices must start at 0 and end at nnz=", nnz,
              ", got ", crow[0], "..", crow[rows]);
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(crow[r] <= crow[r + 1], op, ": crow_indices must be non-decreasing, got ", crow[r], " > ",
                crow[r + 1], " at row ", r);
  }
  // a branch-free (vectorized) min/max pass first: it runs on every call, and a per-entry check costs as much
  // as a sparse GEMV; the position of a bad index is only searched for when there is one
  int64_t lo = 0, hi = 0;
  if (nnz > 0) {
    I mn = col[0], mx = col[0];
    for (int64_t e = 1; e < nnz; ++e) {
      mn = std::min(mn, col[e]);
      mx = std::max(mx, col[e]);
    }
    lo = mn;
    hi = mx;
  }
  if (nnz > 0 && (lo < 0 || hi >= cols)) {
    for (int64_t e = 0; e < nnz; ++e) {
      TORCH_CHECK(col[e] >= 0 && col[e] < cols, op, ": col_indices must lie in [0, K=", cols, "), got ",
                  int64_t(col[e]), " at position ", e);
    }
  }
}

// Dispatches on the value dtype and the column index dtype (int16 / int32).
#define SPARSEKIT_DISPATCH_CSR(VALUES, COL, NAME, ...)                                          \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, (VALUES).scalar_type(), NAME, [&] { \
    if ((COL).scalar_type() == at::kShort) {                                                   \
      using index_t = int16_t;                                                                 \
      __VA_ARGS__();                                                                           \
    } else {                                                                                   \
      using index_t = int32_t;                                                                 \
      __VA_ARGS__();                                                                           \
    }                                                                                          \
  })

// -------------------------------------------------------------------------------- transposed weight
// W^T in CSR form (= W in CSC), values in the accumulation type, rows ascending inside each column: turns
// dx = dy @ W into the forward kernel over W^T, so each task owns its outputs (no atomics, no private dx).
// A serial O(nnz + K) counting sort, small next to the O(M * nnz) product.
template <typename I, typename T, typename A>
void transpose_csr(const int32_t* crow, const I* col, const T* v, int64_t N, int64_t K, std::vector<int32_t>& tptr,
                   std::vector<int32_t>& trow, std::vector<A>& tval) {
  const int64_t nnz = crow[N];
  tptr.assign(K + 1, 0);
  trow.resize(nnz);
  tval.resize(nnz);
  for (int64_t e = 0; e < nnz; ++e) ++tptr[int64_t(col[e]) + 1];
  for (int64_t k = 0; k < K; ++k) tptr[k + 1] += tptr[k];
  std::vector<int32_t> next(tptr.begin(), tptr.end() - 1);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t e = crow[n]; e < crow[n + 1]; ++e) {
      const int32_t p = next[col[e]]++;
      trow[p] = static_cast<int32_t>(n);
      tval[p] = static_cast<A>(v[e]);
    }
  }
}

// ------------------------------------------------------------------------------------------ kernels
// out[m, r] = sum_e v[e] * in[m, idx[e]] (+ bias[r]) for the entries e of row r: the forward product over
// W's rows, and (with W^T's rows) the backward dx. `in` is packed by pack_rows; out is [M, R] row-major.
template <int64_t MT, typename I, typename T, typename A>
void csr_rows_kernel(const A* in, const int32_t* ptr, const I* idx, const A* v, const T* bias, T* out, int64_t M,
                     int64_t C, int64_t R) {
  const int64_t tiles = (M + MT - 1) / MT;
  const int64_t avg_work = R ? MT * (ptr[R] / R + 1) : 1;
  // task = (M tile, row), row fastest: a thread's chunk reuses one packed tile of `in`
  at::parallel_for(0, tiles * R, grain_for(avg_work), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r = t % R, m0 = (t / R) * MT, mc = std::min(MT, M - m0);
      const A* it = in + (t / R) * C * MT;
      const int64_t e0 = ptr[r], e1 = ptr[r + 1];
      Tile<A, MT> acc;
      for (int64_t e = e0; e < e1; ++e) acc.fma(v[e], it + int64_t(idx[e]) * MT);
      const A bv = bias ? static_cast<A>(bias[r]) : A(0);
      for (int64_t j = 0; j < mc; ++j) out[(m0 + j) * R + r] = static_cast<T>(acc[j] + bv);
    }
  });
}

// dx = dy @ W for a few rows of dy: scatter each row of W into a private fp32/fp64 row of dx. Cheaper than
// building W^T (a serial pass over nnz) when M is small; parallel over rows of dy, so no races.
template <typename I, typename T, typename A>
void csr_mm_t_scatter_kernel(const T* dy, const int32_t* crow, const I* col, const T* v, T* dx, int64_t M, int64_t K,
                             int64_t N) {
  at::parallel_for(0, M, grain_for(crow[N] + K), [&](int64_t m0, int64_t m1) {
    std::vector<A> acc(K);
    for (int64_t m = m0; m < m1; ++m) {
      std::fill(acc.begin(), acc.end(), A(0));
      for (int64_t n = 0; n < N; ++n) {
        const A a = static_cast<A>(dy[m * N + n]);
        const int64_t e0 = crow[n], e1 = crow[n + 1];
        for (int64_t e = e0; e < e1; ++e) acc[col[e]] += a * static_cast<A>(v[e]);
      }
      for (int64_t k = 0; k < K; ++k) dx[m * K + k] = static_cast<T>(acc[k]);
    }
  });
}

// out[e] = dy[:, row_e] . x[:, col_e], from transposed copies dyT [N, M], xT [K, M]: every dot is
// contiguous over M.
template <typename I, typename T, typename A>
void csr_sddmm_kernel(const A* dyT, const A* xT, const int32_t* crow, const I* col, T* out, int64_t M, int64_t N) {
  const int64_t avg_work = N ? (crow[N] / N + 1) * M : 1;
  at::parallel_for(0, N, grain_for(avg_work), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t e = crow[n]; e < crow[n + 1]; ++e) {
        out[e] = static_cast<T>(dot(dyT + n * M, xT + int64_t(col[e]) * M, M));
      }
    }
  });
}

// ------------------------------------------------------------------------------- SIMD fast path
// float32 / bfloat16 / float16 with the run-time selected micro-kernels of simd.h, fp32 accumulation; v holds
// fp32 values or raw bf16 bits (wk).
//   xt == false: y [M, N] = x [M, K] @ W^T (+ bias). M = 1: a gather dot per row of W. Otherwise x is packed
//                into fp32 panels [tiles][K][MT], also for M = 2..8, where one pass over W with mostly idle lanes
//                beats a gather dot per (row of x, row of W): 1.2-2.8x faster at M = 2..8 on LLaMA-7B's MLP
//                (the dots read W once per row of x).
//   xt == true:  y^T [B, N, M] = W @ x^T [B, K, M] (+ bias[:, None]) (convolutions): the panels are strided
//                copies of x^T and the output panels are copied straight into y^T, or with `tiling` into a
//                transposed conv's output (tap_tiling.h).
// Tasks = (M tile, nonzero-balanced chunk of rows), M tile outermost so a thread's chunk reuses one panel; rows
// are computed kGroup at a time into one fp32 panel [rows][MT] and then stored.
constexpr int64_t kGroup = 64;

template <typename WT>
inline float wload(const WT* p, int64_t e) {
  if constexpr (std::is_same_v<WT, float>) {
    return p[e];
  } else {
    const uint32_t u = uint32_t(p[e]) << 16;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
  }
}

// y[m, r] = sum_e v[e] * x[m, idx[e]]: four independent partial sums per row.
template <typename I, typename WT>
float csr_dot(const float* x, const int32_t* ptr, const I* idx, const WT* v, int64_t r) {
  float a[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};  // eight chains hide the add latency
  int64_t e = ptr[r];
  const int64_t e1 = ptr[r + 1];
  for (; e + 8 <= e1; e += 8) {
#pragma GCC unroll 8
    for (int u = 0; u < 8; ++u) a[u] += wload(v, e + u) * x[idx[e + u]];
  }
  for (; e < e1; ++e) a[0] += wload(v, e) * x[idx[e]];
  return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

// How many M-vectors a CSR panel spans (csr_fast, csr_conv2d): 4, or fewer when M needs fewer.
int csr_nv(int64_t M, int64_t W) {
  const int64_t mv = (M + W - 1) / W;
  return mv >= 4 ? 4 : mv >= 2 ? 2 : 1;
}

template <typename T, typename I>
void csr_fast(const T* x, bool xt, int64_t B, const int32_t* crow, const I* col, const void* v, WKind wk,
              const T* bias, T* y, int64_t M, int64_t K, int64_t N, const TapTiling* tiling = nullptr) {
  const Isa isa = active_isa();
  const int64_t threads = at::get_num_threads(), nnz = crow[N];
  const int W = vec_floats(isa);
  if (B == 0 || M == 0 || N == 0) return;
  const std::vector<float> bf = bias_f32(bias, N);
  if (!xt && M == 1) {
    std::vector<float> xf;
    const float* xr = as_f32(x, K, xf);
    const std::vector<int64_t> bounds = balanced_chunks(crow, N, 4 * threads, 1, 2);
    const int64_t chunks = int64_t(bounds.size()) - 1;
    const int64_t grain = nnz + N < kMinWork ? chunks : 1;
    at::parallel_for(0, chunks, grain, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        for (int64_t r = bounds[c]; r < bounds[c + 1]; ++r) {
          const float s = wk == WKind::kBF16 ? csr_dot(xr, crow, col, static_cast<const uint16_t*>(v), r)
                                             : csr_dot(xr, crow, col, static_cast<const float*>(v), r);
          y[r] = static_cast<T>(s + (bias ? bf[r] : 0.f));
        }
      }
    });
    return;
  }
  const int nv = csr_nv(M, W);
  const int64_t MT = int64_t(nv) * W, tpi = (M + MT - 1) / MT, tiles = B * tpi;
  at::Tensor xp_t = at::empty({tiles * K * MT}, at::TensorOptions().dtype(at::kFloat));
  float* xp = xp_t.mutable_data_ptr<float>();
  if (xt) {
    pack_panels_xt<T>(x, B, K, M, MT, xp);
  } else {
    pack_panels<T>(isa, x, K, M, K, MT, xp);
  }
  const int64_t want = (4 * threads + tiles - 1) / tiles;
  const std::vector<int64_t> bounds = balanced_chunks(crow, N, want, 1, 4);
  const int64_t chunks = int64_t(bounds.size()) - 1, tasks = tiles * chunks;
  const int64_t grain = B * M * (nnz + N) < kMinWork ? tasks : 1;
  at::parallel_for(0, tasks, grain, [&](int64_t t0, int64_t t1) {
    std::vector<float> out(kGroup * MT), scratch;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t tile = t / chunks, c = t % chunks;
      const int64_t b = tile / tpi, m0 = (tile % tpi) * MT, mc = std::min(MT, M - m0);
      const float* xtile = xp + tile * K * MT;
      for (int64_t r0 = bounds[c]; r0 < bounds[c + 1]; r0 += kGroup) {
        const int64_t r1 = std::min(bounds[c + 1], r0 + kGroup);
        csr_panel_rows(isa, nv, xtile, nullptr, crow, col, v, wk, r0, r1, out.data());
        const float* br = bias ? bf.data() + r0 : nullptr;
        if (tiling) {
          store_panel_tiled<T>(out.data(), MT, r1 - r0, mc, br, y + b * tiling->image, tiling->row_off.data() + r0,
                               tiling->col_off.data() + m0);
        } else if (xt) {
          store_panel_xt<T>(out.data(), MT, r1 - r0, mc, br, y + b * N * M + r0 * M + m0, M);
        } else {
          store_panel<T>(isa, out.data(), MT, r1 - r0, mc, br, y + m0 * N + r0, N, scratch);
        }
      }
    }
  });
}

// The SIMD path of csr_mm (xt false: x [M, K]) and csr_mm_xt (xt true: x^T [B, K, M]) into y: the pattern
// checked for the column index type (check_structure), then csr_fast with the values as fast_values gives them.
void csr_mm_fast(const char* op, const at::Tensor& x, bool xt, int64_t B, const at::Tensor& crow,
                 const at::Tensor& col, const at::Tensor& values, const at::Tensor& bias, at::Tensor& y, int64_t M,
                 int64_t K, int64_t n, const TapTiling* tiling = nullptr) {
  const auto [fv, wk] = fast_values(values);
  SPARSEKIT_DISPATCH_CSR(x, col, "sparsekit_csr_mm_fast", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      const index_t* c = col.const_data_ptr<index_t>();
      check_structure(op, crow.const_data_ptr<int32_t>(), c, n, values.numel(), K);
      csr_fast<scalar_t, index_t>(x.const_data_ptr<scalar_t>(), xt, B, crow.const_data_ptr<int32_t>(), c,
                                  fv.const_data_ptr(), wk, bias_ptr<scalar_t>(bias), y.mutable_data_ptr<scalar_t>(), M,
                                  K, n, tiling);
    }
  });
}

// ------------------------------------------------------------------------------------------------ ops
at::Tensor csr_mm(const at::Tensor& x_in, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                  const std::optional<at::Tensor>& bias_in, int64_t n) {
  constexpr const char* op = "sparsekit::csr_mm";
  check_csr_mm_args(op, x_in, "x", 2, crow, col, values, n);
  const at::Tensor bias = checked_bias(op, bias_in, n, x_in, "x");
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor y = at::empty({M, n}, x.options());
  if (use_fast(x.scalar_type())) {
    csr_mm_fast(op, x, false, 1, crow, col, values, bias, y, M, K, n);
    return y;
  }
  SPARSEKIT_DISPATCH_CSR(x, col, "sparsekit_csr_mm", [&] {
    using A = at::opmath_type<scalar_t>;
    const index_t* c = col.const_data_ptr<index_t>();
    check_structure(op, crow.const_data_ptr<int32_t>(), c, n, values.numel(), K);
    const at::Tensor v = to_acc(values);
    with_packed_rows<scalar_t, A>(x, M, K, [&](auto mt, const A* xp) {
      csr_rows_kernel<decltype(mt)::value, index_t, scalar_t, A>(xp, crow.const_data_ptr<int32_t>(), c,
                                                                 v.const_data_ptr<A>(), bias_ptr<scalar_t>(bias),
                                                                 y.mutable_data_ptr<scalar_t>(), M, K, n);
    });
  });
  return y;
}

// y^T [B, n, M] = W @ x^T [B, K, M] (+ bias[:, None]): csr_mm in the transposed (convolution) layout.
at::Tensor csr_mm_xt(const at::Tensor& xt_in, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                     const std::optional<at::Tensor>& bias_in, int64_t n) {
  constexpr const char* op = "sparsekit::csr_mm_xt";
  check_csr_mm_args(op, xt_in, "xt", 3, crow, col, values, n);
  const int64_t B = xt_in.size(0), K = xt_in.size(1), M = xt_in.size(2);
  if (!use_fast(xt_in.scalar_type())) {  // float64: the row-layout kernel on transposed copies
    const at::Tensor y = csr_mm(xt_in.transpose(1, 2).reshape({B * M, K}), crow, col, values, bias_in, n);
    return y.reshape({B, M, n}).transpose(1, 2).contiguous();
  }
  const at::Tensor bias = checked_bias(op, bias_in, n, xt_in, "xt");
  const at::Tensor xt = xt_in.contiguous();
  at::Tensor y = at::empty({B, n, M}, xt.options());
  csr_mm_fast(op, xt, true, B, crow, col, values, bias, y, M, K, n);
  return y;
}

// csr_mm_xt written straight into the output of a transposed conv whose taps tile it (tap_tiling.h): y [B, n /
// prod(kernel), *(sizes * kernel)]; float64 computes y^T and rearranges it.
at::Tensor csr_mm_xt_tiled(const at::Tensor& xt_in, const at::Tensor& crow, const at::Tensor& col,
                           const at::Tensor& values, const std::optional<at::Tensor>& bias_in, int64_t n,
                           at::IntArrayRef sizes, at::IntArrayRef kernel) {
  constexpr const char* op = "sparsekit::csr_mm_xt_tiled";
  check_csr_mm_args(op, xt_in, "xt", 3, crow, col, values, n);
  const at::Tensor bias = checked_bias(op, bias_in, n, xt_in, "xt");
  const TapTiling tiling = tap_tiling(op, xt_in, n, sizes, kernel);
  if (!use_fast(xt_in.scalar_type())) {
    return tile_taps(csr_mm_xt(xt_in, crow, col, values, bias_in, n), tiling, sizes, kernel);
  }
  const at::Tensor xt = xt_in.contiguous();
  at::Tensor y = at::empty(tiling.shape, xt.options());
  csr_mm_fast(op, xt, true, xt.size(0), crow, col, values, bias, y, xt.size(2), xt.size(1), n, &tiling);
  return y;
}

// y [B, n, (Do,) Ho, Wo] = conv2d / conv3d(x [B, C, (D,) H, W], W [n, C*(kd*)kh*kw] CSR) (+ bias): conv_panels
// (panel.h), no im2col; op (named in errors) has nd spatial dims.
at::Tensor csr_conv(const char* op, size_t nd, const at::Tensor& x_in, const at::Tensor& crow, const at::Tensor& col,
                    const at::Tensor& values, const std::optional<at::Tensor>& bias_in, at::IntArrayRef kernel_size,
                    at::IntArrayRef padding, at::IntArrayRef dilation, at::IntArrayRef stride) {
  check_tensor(op, values, "values", 1);
  check_indices(op, crow, col);
  const ConvGeom g = checked_conv_geom(op, nd, x_in, values, kernel_size, padding, dilation, stride);
  const int64_t K = g.K();
  const int64_t n = crow.numel() - 1;
  TORCH_CHECK(n >= 0, op, ": crow_indices must have n + 1 >= 1 entries");
  check_nnz(op, col, values);
  const at::Tensor bias = checked_bias(op, bias_in, n, x_in, "x");
  const std::vector<int64_t> y_shape = conv_out_shape(g, n, nd);
  if (!use_fast(x_in.scalar_type())) {  // float64: im2col + the transposed-layout op
    const at::Tensor cols = conv_patches(x_in, kernel_size, padding, dilation, stride);
    return csr_mm_xt(cols, crow, col, values, bias_in, n).reshape(y_shape);
  }
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty(y_shape, x.options());
  if (g.B == 0 || n == 0) {   // nothing to compute; the pattern is still checked, as for any batch
    SPARSEKIT_DISPATCH_CSR(x, col, "sparsekit_csr_conv_check", [&] {
      check_structure(op, crow.const_data_ptr<int32_t>(), col.const_data_ptr<index_t>(), n, values.numel(), K);
    });
    return y;
  }
  const auto [fv, wk] = fast_values(values);
  const Isa isa = active_isa();
  const int64_t threads = at::get_num_threads(), Mg = g.grid();
  const int64_t W = vec_floats(isa);
  const int nv = csr_nv(Mg, W);
  const int64_t MT = int64_t(nv) * W, tiles = g.slices() * ((Mg + MT - 1) / MT);
  const int32_t* cr = crow.const_data_ptr<int32_t>();
  const std::vector<int64_t> bounds = balanced_chunks(cr, n, (4 * threads + tiles - 1) / tiles, 1, 4);
  const void* v = fv.const_data_ptr();
  const std::vector<float> bf = bias_vec(bias);
  SPARSEKIT_DISPATCH_CSR(x, col, "sparsekit_csr_conv2d", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      const index_t* c = col.const_data_ptr<index_t>();
      check_structure(op, cr, c, n, values.numel(), K);
      conv_panels<scalar_t>(x.const_data_ptr<scalar_t>(), g, n, MT, bounds, 1, bf.empty() ? nullptr : bf.data(),
                            y.mutable_data_ptr<scalar_t>(), /*in_place=*/true,
                            [&](const float* xt, const int64_t* rowoff, int64_t u0, int64_t u1, float* out) {
                              csr_panel_rows(isa, nv, xt, rowoff, cr, c, v, wk, u0, u1, out);
                            });
    }
  });
  return y;
}

at::Tensor csr_conv2d(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                      const std::optional<at::Tensor>& bias, at::IntArrayRef kernel_size, at::IntArrayRef padding,
                      at::IntArrayRef dilation, at::IntArrayRef stride) {
  return csr_conv("sparsekit::csr_conv2d", 2, x, crow, col, values, bias, kernel_size, padding, dilation, stride);
}

at::Tensor csr_conv3d(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                      const std::optional<at::Tensor>& bias, at::IntArrayRef kernel_size, at::IntArrayRef padding,
                      at::IntArrayRef dilation, at::IntArrayRef stride) {
  return csr_conv("sparsekit::csr_conv3d", 3, x, crow, col, values, bias, kernel_size, padding, dilation, stride);
}


at::Tensor csr_mm_t(const at::Tensor& dy_in, const at::Tensor& crow, const at::Tensor& col,
                    const at::Tensor& values, int64_t k) {
  constexpr const char* op = "sparsekit::csr_mm_t";
  check_operands(op, dy_in, "dy", 2, values, 1);
  check_indices(op, crow, col);
  TORCH_CHECK(k >= 0, op, ": k must be non-negative, got ", k);
  const int64_t M = dy_in.size(0), N = dy_in.size(1);
  TORCH_CHECK(crow.numel() == N + 1, op, ": crow_indices must have dy.size(1) + 1 = ", N + 1, " entries, got ",
              crow.numel());
  check_nnz(op, col, values);
  const at::Tensor dy = dy_in.contiguous();
  at::Tensor dx = at::empty({M, k}, dy.options());
  SPARSEKIT_DISPATCH_CSR(dy, col, "sparsekit_csr_mm_t", [&] {
    using A = at::opmath_type<scalar_t>;
    const index_t* c = col.const_data_ptr<index_t>();
    const int32_t* cr = crow.const_data_ptr<int32_t>();
    check_structure(op, cr, c, N, values.numel(), k);
    if (M < kScatterMaxM) {
      csr_mm_t_scatter_kernel<index_t, scalar_t, A>(dy.const_data_ptr<scalar_t>(), cr, c,
                                                    values.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(),
                                                    M, k, N);
      return;
    }
    std::vector<int32_t> tptr, trow;
    std::vector<A> tval;
    transpose_csr<index_t, scalar_t, A>(cr, c, values.const_data_ptr<scalar_t>(), N, k, tptr, trow, tval);
    if constexpr (std::is_same_v<A, float>) {  // float32 / bfloat16 / float16: the SIMD forward over W^T
      csr_fast<scalar_t, int32_t>(dy.const_data_ptr<scalar_t>(), false, 1, tptr.data(), trow.data(), tval.data(),
                                  WKind::kF32, nullptr, dx.mutable_data_ptr<scalar_t>(), M, N, k);
      return;
    }
    with_packed_rows<scalar_t, A>(dy, M, N, [&](auto mt, const A* dyp) {
      csr_rows_kernel<decltype(mt)::value, int32_t, scalar_t, A>(dyp, tptr.data(), trow.data(), tval.data(), nullptr,
                                                                 dx.mutable_data_ptr<scalar_t>(), M, N, k);
    });
  });
  return dx;
}

at::Tensor csr_sddmm(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col) {
  constexpr const char* op = "sparsekit::csr_sddmm";
  check_sddmm_operands(op, dy, x);
  check_indices(op, crow, col);
  const int64_t M = dy.size(0), N = dy.size(1), K = x.size(1);
  check_sddmm_rows(op, dy, x);
  TORCH_CHECK(crow.numel() == N + 1, op, ": crow_indices must have dy.size(1) + 1 = ", N + 1, " entries, got ",
              crow.numel());
  at::Tensor out = at::empty({col.numel()}, dy.options());
  SPARSEKIT_DISPATCH_CSR(dy, col, "sparsekit_csr_sddmm", [&] {
    using A = at::opmath_type<scalar_t>;
    const index_t* c = col.const_data_ptr<index_t>();
    check_structure(op, crow.const_data_ptr<int32_t>(), c, N, col.numel(), K);
    const at::Tensor dyT = to_acc(dy.t()).contiguous(), xT = to_acc(x.t()).contiguous();
    if constexpr (std::is_same_v<A, float>) {  // float32 / bfloat16 / float16: SIMD dots, fp32 results
      const Isa isa = active_isa();
      const int32_t* cr = crow.const_data_ptr<int32_t>();
      at::Tensor of = std::is_same_v<scalar_t, float> ? out : at::empty({col.numel()}, out.options().dtype(at::kFloat));
      float* o = of.mutable_data_ptr<float>();
      const std::vector<int64_t> bounds = balanced_chunks(cr, N, 4 * at::get_num_threads(), M, 0);
      at::parallel_for(0, int64_t(bounds.size()) - 1, 1, [&](int64_t q0, int64_t q1) {
        for (int64_t q = q0; q < q1; ++q)
          csr_sddmm_rows(isa, dyT.const_data_ptr<float>(), xT.const_data_ptr<float>(), M, cr, c, bounds[q],
                         bounds[q + 1], o);
      });
      if (!std::is_same_v<scalar_t, float>) out.copy_(of);
      return;
    }
    csr_sddmm_kernel<index_t, scalar_t, A>(dyT.const_data_ptr<A>(), xT.const_data_ptr<A>(),
                                           crow.const_data_ptr<int32_t>(), c, out.mutable_data_ptr<scalar_t>(), M, N);
  });
  return out;
}

}  // namespace

namespace sparsekit::cpu {
at::Tensor csr_mm_cpu(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                      const std::optional<at::Tensor>& bias, int64_t n) {
  return csr_mm(x, crow, col, values, bias, n);
}
at::Tensor csr_mm_t_cpu(const at::Tensor& dy, const at::Tensor& crow, const at::Tensor& col,
                        const at::Tensor& values, int64_t k) {
  return csr_mm_t(dy, crow, col, values, k);
}
at::Tensor csr_sddmm_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col) {
  return csr_sddmm(dy, x, crow, col);
}
}  // namespace sparsekit::cpu

TORCH_LIBRARY_IMPL(sparsekit, CPU, m) {
  m.impl("csr_mm", &csr_mm);
  m.impl("csr_mm_t", &csr_mm_t);
  m.impl("csr_mm_xt", &csr_mm_xt);
  m.impl("csr_mm_xt_tiled", &csr_mm_xt_tiled);
  m.impl("csr_conv2d", &csr_conv2d);
  m.impl("csr_conv3d", &csr_conv3d);
  m.impl("csr_sddmm", &csr_sddmm);
}
