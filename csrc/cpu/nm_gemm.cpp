// CPU kernels for the n:m ops (schemas and semantics in csrc/ops.cpp). W [N, K] keeps n values in every
// group of m along K: values [N, K/m*n], indices uint8 [N, K/m*n] (position inside the group).
// fp32 / bf16 / fp16 run as CSR products (csr_view below), or for up to 8 rows of x with n <= m / 2 on AVX-512 /
// AVX2 through nm_gemv.cpp, which reads the format directly; float64 runs the loops here:
//   nm_mm     y  = x @ W^T + bias    parallel over (M tile, row of W): each task owns a tile of y
//   nm_mm_t   dx = dy @ W            parallel over (M tile, chunk of groups): group g only feeds dx
//                                    columns [g*m, (g+1)*m), so each task owns a tile of dx
//   nm_sddmm  dW = dy^T @ x on W's pattern, parallel over rows of W: one contiguous dot over M per value
// 16-bit types accumulate in fp32 (at::opmath_type).
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
#include <utility>
#include <vector>

#include "checks.h"
#include "csr.h"
#include "nm_gemv.h"
#include "tiles.h"
#include "values.h"

namespace {

using namespace sparsekit::cpu;

constexpr int64_t kTileCols = 256;   // dx columns per nm_mm_t task (whole groups)

// ------------------------------------------------------------------------------------------- checks
// n, m and the indices tensor; returns K = indices.size(1) / n * m. Positions >= m would read out of bounds,
// so they are rejected (O(N * K/m*n), small next to the product).
int64_t check_pattern(const char* op, const at::Tensor& indices, int64_t n, int64_t m) {
  TORCH_CHECK(n >= 1 && n <= m && m <= 256, op, ": n and m must satisfy 1 <= n <= m <= 256 (uint8 positions), got n=",
              n, ", m=", m);
  check_tensor(op, indices, "indices", 2);
  TORCH_CHECK(indices.scalar_type() == at::kByte, op, ": indices must have dtype torch.uint8, got ",
              dtype_name(indices.scalar_type()));
  TORCH_CHECK(indices.is_contiguous(), op, ": indices must be contiguous");
  const int64_t kept = indices.size(1);
  TORCH_CHECK(kept % n == 0, op, ": indices.size(1) (", kept, ") must be a multiple of n=", n,
              " (K/m groups of n kept values per row)");
  // a branch-free (vectorized), parallel max first: this runs on every call, and a decoding product reads little
  // more than the indices; the position is searched only when one is out of range
  const uint8_t* p = indices.const_data_ptr<uint8_t>();
  const uint8_t hi = at::parallel_reduce(
      0, indices.numel(), int64_t(1) << 16, uint8_t(0),
      [&](int64_t e0, int64_t e1, uint8_t acc) {
        for (int64_t e = e0; e < e1; ++e) acc = std::max(acc, p[e]);
        return acc;
      },
      [](uint8_t a, uint8_t b) { return std::max(a, b); });
  if (indices.numel() > 0 && hi >= m) {
    for (int64_t e = 0; e < indices.numel(); ++e) {
      TORCH_CHECK(p[e] < m, op, ": indices must lie in [0, m=", m, "), got ", int64_t(p[e]), " at flat position ",
                  e);
    }
  }
  return kept / n * m;
}

// The arguments nm_mm and nm_mm_t share: the dense operand act (floating, 2-D), the pattern (check_pattern) and
// values [N, K/m*n] of act's dtype (check_values) shaped like indices; returns K.
int64_t check_nm_operands(const char* op, const at::Tensor& act, const char* act_name, const at::Tensor& values,
                          const at::Tensor& indices, int64_t n, int64_t m) {
  check_tensor(op, act, act_name, 2);
  check_floating(op, act, act_name);
  const int64_t K = check_pattern(op, indices, n, m);
  check_values(op, values, 2, act, act_name);
  TORCH_CHECK(values.sizes() == indices.sizes(), op, ": values and indices must have the same shape, got ",
              values.sizes(), " and ", indices.sizes());
  return K;
}

// ------------------------------------------------------------------------------------------ kernels
// y[mm, r] = sum over kept values e of row r: v[r, e] * x[mm, (e / n) * m + idx[r, e]]
template <int64_t MT, typename T, typename A>
void nm_mm_kernel(const A* xp, const A* v, const uint8_t* idx, const T* bias, T* y, int64_t M, int64_t K, int64_t N,
                  int64_t n, int64_t m) {
  const int64_t groups = K / m, kept = groups * n, tiles = (M + MT - 1) / MT;
  // task = (M tile, row of W), row fastest: a thread's chunk reuses one packed x tile
  at::parallel_for(0, tiles * N, grain_for(MT * kept), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r = t % N, m0 = (t / N) * MT, mc = std::min(MT, M - m0);
      const A* xt = xp + (t / N) * K * MT;
      const A* vr = v + r * kept;
      const uint8_t* ir = idx + r * kept;
      Tile<A, MT> acc;
      for (int64_t g = 0, e = 0; g < groups; ++g) {
        const A* xg = xt + g * m * MT;
        for (int64_t j = 0; j < n; ++j, ++e) acc.fma(vr[e], xg + int64_t(ir[e]) * MT);
      }
      const A bv = bias ? static_cast<A>(bias[r]) : A(0);
      for (int64_t l = 0; l < mc; ++l) y[(m0 + l) * N + r] = static_cast<T>(acc[l] + bv);
    }
  });
}

// dx[mm, g*m + idx[r, e]] += dy[mm, r] * v[r, e]. Group g only feeds dx columns [g*m, (g+1)*m), so a task
// owning (M tile, chunk of groups) owns that tile of dx: no atomics. Its accumulator [width][MT] stays in L1.
template <int64_t MT, typename T, typename A>
void nm_mm_t_kernel(const A* dyp, const A* v, const uint8_t* idx, T* dx, int64_t M, int64_t K, int64_t N, int64_t n,
                    int64_t m) {
  const int64_t groups = K / m, kept = groups * n, tiles = (M + MT - 1) / MT;
  const int64_t tile_groups = std::max<int64_t>(1, kTileCols / m);
  const int64_t gtiles = (groups + tile_groups - 1) / tile_groups;
  at::parallel_for(0, tiles * gtiles, grain_for(MT * N * tile_groups * n), [&](int64_t t0, int64_t t1) {
    std::vector<A> acc(tile_groups * m * MT);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t gt = t % gtiles, m0 = (t / gtiles) * MT, mc = std::min(MT, M - m0);
      const int64_t g0 = gt * tile_groups, gc = std::min(tile_groups, groups - g0), width = gc * m;
      const A* dyt = dyp + (t / gtiles) * N * MT;
      std::fill(acc.begin(), acc.begin() + width * MT, A(0));
      for (int64_t r = 0; r < N; ++r) {
        const A* d = dyt + r * MT;
        const A* vr = v + r * kept + g0 * n;
        const uint8_t* ir = idx + r * kept + g0 * n;
        for (int64_t g = 0, e = 0; g < gc; ++g) {
          for (int64_t j = 0; j < n; ++j, ++e) {
            const A wv = vr[e];
            A* a = acc.data() + (g * m + ir[e]) * MT;
#pragma omp simd
            for (int64_t l = 0; l < MT; ++l) a[l] += wv * d[l];
          }
        }
      }
      for (int64_t c = 0; c < width; ++c) {
        for (int64_t l = 0; l < mc; ++l) dx[(m0 + l) * K + g0 * m + c] = static_cast<T>(acc[c * MT + l]);
      }
    }
  });
}

// out[r, e] = dy[:, r] . x[:, col_e], from transposed copies dyT [N, M], xT [K, M]: every dot is
// contiguous over M.
template <typename T, typename A>
void nm_sddmm_kernel(const A* dyT, const A* xT, const uint8_t* idx, T* out, int64_t M, int64_t K, int64_t N,
                     int64_t n, int64_t m) {
  const int64_t kept = K / m * n;
  at::parallel_for(0, N, grain_for(kept * M), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* ir = idx + r * kept;
      for (int64_t g = 0, e = 0; e < kept; ++g) {
        for (int64_t j = 0; j < n; ++j, ++e) {
          out[r * kept + e] = static_cast<T>(dot(dyT + r * M, xT + (g * m + ir[e]) * M, M));
        }
      }
    }
  });
}

// The n:m pattern as CSR index arrays (row r's kept values in stored order, column g * m + idx): every row holds
// K/m*n values, so the values array [N, K/m*n] is already CSR's. The products of fp32/bf16/fp16 then run on the
// CSR kernels' SIMD micro-kernels (csr.h) instead of the generic loops below; building the columns costs
// O(nnz) int16 (int32 when K > 32767) per call, beside the O(M * nnz) product. Undefined tensors when nnz does
// not fit CSR's int32 row pointers.
std::pair<at::Tensor, at::Tensor> csr_view(const at::Tensor& indices, int64_t n, int64_t m, int64_t K) {
  const int64_t N = indices.size(0), kept = indices.size(1);
  if (N * kept >= (int64_t(1) << 31)) return {};
  at::Tensor crow = at::empty({N + 1}, at::TensorOptions().dtype(at::kInt));
  int32_t* cr = crow.mutable_data_ptr<int32_t>();
  for (int64_t r = 0; r <= N; ++r) cr[r] = static_cast<int32_t>(r * kept);
  const bool narrow = K <= 32767;
  at::Tensor col = at::empty({N * kept}, at::TensorOptions().dtype(narrow ? at::kShort : at::kInt));
  const uint8_t* idx = indices.const_data_ptr<uint8_t>();
  auto fill = [&](auto* c) {
    using I = std::remove_pointer_t<decltype(c)>;
    at::parallel_for(0, N, grain_for(kept), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t e = r * kept, g = 0; g < kept / n; ++g) {   // (no division per entry)
          for (int64_t j = 0; j < n; ++j, ++e) c[e] = static_cast<I>(g * m + idx[e]);
        }
      }
    });
  };
  if (narrow) fill(col.mutable_data_ptr<int16_t>());
  else fill(col.mutable_data_ptr<int32_t>());
  return {crow, col};
}

// ------------------------------------------------------------------------------------------------ ops
at::Tensor nm_mm(const at::Tensor& x_in, const at::Tensor& values, const at::Tensor& indices,
                 const std::optional<at::Tensor>& bias_in, int64_t n, int64_t m) {
  constexpr const char* op = "sparsekit::nm_mm";
  const int64_t K = check_nm_operands(op, x_in, "x", values, indices, n, m);
  const int64_t M = x_in.size(0), N = values.size(0);
  TORCH_CHECK(x_in.size(1) == K, op, ": x.size(1) must be K = values.size(1) / n * m = ", K, ", got ", x_in.size(1));
  const at::Tensor bias = checked_bias(op, bias_in, N, x_in, "x");
  const Isa isa = active_isa();   // (read once: SPARSEKIT_CPU_ISA may change between calls)
  if (use_fast(x_in.scalar_type()) && nm_gemv_supported(isa, M, n, m)) {   // decoding: no CSR view to build
    const at::Tensor x = x_in.contiguous().to(at::kFloat);
    const auto [fv, wk] = fast_values(values);
    const at::Tensor bf = bias.defined() ? bias.to(at::kFloat).contiguous() : at::Tensor();
    at::Tensor out = at::empty({M, N}, x.options());
    nm_gemv(isa, x.const_data_ptr<float>(), M, K, fv.const_data_ptr(), wk == WKind::kBF16,
            indices.const_data_ptr<uint8_t>(), N, n, m, bf.defined() ? bf.const_data_ptr<float>() : nullptr,
            out.mutable_data_ptr<float>());
    return out.to(x_in.scalar_type());
  }
  if (use_fast(x_in.scalar_type())) {
    const auto [crow, col] = csr_view(indices, n, m, K);
    if (crow.defined()) return csr_mm_cpu(x_in, crow, col, values.reshape({-1}), bias_in, N);
  }
  const at::Tensor x = x_in.contiguous(), v = to_acc(values);
  at::Tensor y = at::empty({M, N}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sparsekit_nm_mm", [&] {
    using A = at::opmath_type<scalar_t>;
    with_packed_rows<scalar_t, A>(x, M, K, [&](auto mt, const A* xp) {
      nm_mm_kernel<decltype(mt)::value, scalar_t, A>(xp, v.const_data_ptr<A>(), indices.const_data_ptr<uint8_t>(),
                                                     bias_ptr<scalar_t>(bias), y.mutable_data_ptr<scalar_t>(), M, K, N,
                                                     n, m);
    });
  });
  return y;
}

at::Tensor nm_mm_t(const at::Tensor& dy_in, const at::Tensor& values, const at::Tensor& indices, int64_t n,
                   int64_t m) {
  constexpr const char* op = "sparsekit::nm_mm_t";
  const int64_t K = check_nm_operands(op, dy_in, "dy", values, indices, n, m);
  const int64_t M = dy_in.size(0), N = dy_in.size(1);
  TORCH_CHECK(values.size(0) == N, op, ": dy.size(1) must be N = values.size(0) = ", values.size(0), ", got ", N);
  if (use_fast(dy_in.scalar_type())) {
    const auto [crow, col] = csr_view(indices, n, m, K);
    if (crow.defined()) return csr_mm_t_cpu(dy_in, crow, col, values.reshape({-1}), K);
  }
  const at::Tensor dy = dy_in.contiguous(), v = to_acc(values);
  at::Tensor dx = at::empty({M, K}, dy.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "sparsekit_nm_mm_t", [&] {
    using A = at::opmath_type<scalar_t>;
    with_packed_rows<scalar_t, A>(dy, M, N, [&](auto mt, const A* dyp) {
      nm_mm_t_kernel<decltype(mt)::value, scalar_t, A>(dyp, v.const_data_ptr<A>(), indices.const_data_ptr<uint8_t>(),
                                                       dx.mutable_data_ptr<scalar_t>(), M, K, N, n, m);
    });
  });
  return dx;
}

at::Tensor nm_sddmm(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& indices, int64_t n, int64_t m) {
  constexpr const char* op = "sparsekit::nm_sddmm";
  check_sddmm_operands(op, dy, x);
  const int64_t K = check_pattern(op, indices, n, m);
  const int64_t M = dy.size(0), N = dy.size(1);
  check_sddmm_rows(op, dy, x);
  TORCH_CHECK(indices.size(0) == N, op, ": dy.size(1) must be N = indices.size(0) = ", indices.size(0), ", got ", N);
  TORCH_CHECK(x.size(1) == K, op, ": x.size(1) must be K = indices.size(1) / n * m = ", K, ", got ", x.size(1));
  if (use_fast(dy.scalar_type())) {
    const auto [crow, col] = csr_view(indices, n, m, K);
    if (crow.defined()) return csr_sddmm_cpu(dy, x, crow, col).reshape(indices.sizes());
  }
  at::Tensor out = at::empty(indices.sizes(), dy.options());
  const at::Tensor dyT = to_acc(dy.t()).contiguous(), xT = to_acc(x.t()).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "sparsekit_nm_sddmm", [&] {
    using A = at::opmath_type<scalar_t>;
    nm_sddmm_kernel<scalar_t, A>(dyT.const_data_ptr<A>(), xT.const_data_ptr<A>(), indices.const_data_ptr<uint8_t>(),
                                 out.mutable_data_ptr<scalar_t>(), M, K, N, n, m);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekit, CPU, m) {
  m.impl("nm_mm", &nm_mm);
  m.impl("nm_mm_t", &nm_mm_t);
  m.impl("nm_sddmm", &nm_sddmm);
}
