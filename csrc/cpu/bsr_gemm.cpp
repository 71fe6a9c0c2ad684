// CPU kernels for the BSR ops (schemas and semantics in csrc/ops.cpp):
//   bsr_mm     y  = x @ W^T + bias    parallel over (block-row, M tile): each task owns a tile of y
//   bsr_mm_t   dx = dy @ W            parallel over (block-column, M tile) through a block-CSC view of W
//   bsr_sddmm  dW = dy^T @ x on W's blocks, parallel over stored blocks
// 16-bit types accumulate in fp32 (at::opmath_type). Plain loops with a contiguous inner loop that the
// compiler vectorizes (see pack_rows); hand-written SIMD micro-kernels are a later step.
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

namespace {

constexpr int64_t kMaxBlock = 128;   // sparsekit.formats.MAX_BLOCK
constexpr int64_t kMinWork = 32768;  // multiply-adds per parallel chunk, so tiny problems stay serial

// ------------------------------------------------------------------------------------------- checks
const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kByte: return "torch.uint8";
    case at::kLong: return "torch.int64";
    default: return c10::toString(t);
  }
}

void check_tensor(const char* op, const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
}

void check_floating(const char* op, const at::Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16, op, ": ", name,
              " must be float32, float64, float16 or bfloat16, got ", dtype_name(s));
}

void check_same_dtype(const char* op, const at::Tensor& t, const char* name, const at::Tensor& ref,
                      const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have the dtype of ", ref_name, " (",
              dtype_name(ref.scalar_type()), "), got ", dtype_name(t.scalar_type()));
}

void check_index(const char* op, const at::Tensor& t, const char* name) {
  check_tensor(op, t, name, 1);
  TORCH_CHECK(t.scalar_type() == at::kInt, op, ": ", name, " must have dtype torch.int32, got ",
              dtype_name(t.scalar_type()));
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

void check_block(const char* op, int64_t bn, int64_t bk) {
  TORCH_CHECK(bn >= 1 && bn <= kMaxBlock && bk >= 1 && bk <= kMaxBlock, op, ": block (", bn, ", ", bk,
              ") must have both sides in [1, ", kMaxBlock, "]");
}

// Rejects index data that would read out of bounds. O(rows + nnzb), negligible next to the product.
void check_structure(const char* op, const at::Tensor& crow, const at::Tensor& col, int64_t rows, int64_t cols) {
  TORCH_CHECK(crow.numel() == rows + 1, op, ": crow_indices must have N/block_n + 1 = ", rows + 1,
              " entries, got ", crow.numel());
  const int32_t* cr = crow.data_ptr<int32_t>();
  const int32_t* cc = col.data_ptr<int32_t>();
  const int64_t nnzb = col.numel();
  TORCH_CHECK(cr[0] == 0 && cr[rows] == nnzb, op, ": crow_indices must start at 0 and end at nnzb=", nnzb,
              ", got ", cr[0], "..", cr[rows]);
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(cr[r] <= cr[r + 1], op, ": crow_indices must be non-decreasing, got ", cr[r], " > ", cr[r + 1],
                " at block-row ", r);
  }
  for (int64_t b = 0; b < nnzb; ++b) {
    TORCH_CHECK(cc[b] >= 0 && cc[b] < cols, op, ": col_indices must lie in [0, K/block_k = ", cols, "), got ",
                cc[b], " at position ", b);
  }
}

int64_t grain_for(int64_t work_per_task) {
  return std::max<int64_t>(1, kMinWork / std::max<int64_t>(1, work_per_task));
}

// ------------------------------------------------------------------------------------ data movement
// The kernels vectorize over M: activations are packed in tiles of MT rows, transposed, in the
// accumulation type: packed[t][c][j] = src[t*MT + j][c], zero past M. Every inner loop is then an MT-wide
// contiguous axpy, whatever the block shape, and 16-bit inputs are converted once instead of per use.
template <int64_t MT, typename T, typename A>
at::Tensor pack_rows(const at::Tensor& src, int64_t M, int64_t C) {
  const int64_t tiles = (M + MT - 1) / MT;
  at::Tensor dst = at::empty({tiles, C, MT}, src.options().dtype(c10::CppTypeToScalarType<A>::value));
  const T* s = src.const_data_ptr<T>();
  A* d = dst.mutable_data_ptr<A>();
  at::parallel_for(0, tiles, grain_for(C * MT), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t j = 0; j < MT; ++j) {
        const int64_t m = t * MT + j;
        A* dt = d + t * C * MT + j;
        if (m < M) {
          for (int64_t c = 0; c < C; ++c) dt[c * MT] = static_cast<A>(s[m * C + c]);
        } else {
          for (int64_t c = 0; c < C; ++c) dt[c * MT] = A(0);
        }
      }
    }
  });
  return dst;
}

// MT = 16 lanes for real batches; 4 or 1 for tiny M, where padding to 16 would waste most of the work.
template <typename F>
void with_m_tile(int64_t M, const F& f) {
  if (M >= 16) {
    f(std::integral_constant<int64_t, 16>{});
  } else if (M >= 4) {
    f(std::integral_constant<int64_t, 4>{});
  } else {
    f(std::integral_constant<int64_t, 1>{});
  }
}

// MT accumulators held in 16-byte vectors (GCC/Clang vector extension: SSE2 on plain x86-64, NEON on
// arm64). Written as a plain loop over MT, GCC 12 sometimes vectorized the surrounding loop over stored
// weights instead and ran 4x slower; explicit vectors keep the accumulators in registers. MT is 1 or a
// multiple of the lanes (with_m_tile gives 1, 4 or 16).
template <typename A, int64_t MT>
struct Tile {
  typedef A V __attribute__((vector_size(16)));
  static constexpr int64_t kLanes = 16 / sizeof(A), kVecs = MT == 1 ? 1 : MT / kLanes;
  static_assert(MT == 1 || MT % kLanes == 0, "M tile must be 1 or a multiple of the vector lanes");
  V acc[kVecs] = {};
  A acc1 = 0;  // MT == 1

  // acc[0:MT] += w * x[0:MT]
  inline void fma(A w, const A* x) {
    if constexpr (MT == 1) {
      acc1 += w * x[0];
    } else {
      for (int64_t i = 0; i < kVecs; ++i) {
        V xv;
        std::memcpy(&xv, x + i * kLanes, sizeof(V));  // unaligned vector load
        acc[i] += w * xv;
      }
    }
  }
  inline A operator[](int64_t j) const {
    if constexpr (MT == 1) {
      return acc1;
    } else {
      return acc[j / kLanes][j % kLanes];
    }
  }
};

template <typename A>
inline A dot(const A* a, const A* b, int64_t n) {
  A s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// ------------------------------------------------------------------------------------------ kernels
// y[m, r*bn + i] = sum over blocks b of block-row r: W_b[i, :] . x[m, col_b*bk : +bk]
template <int64_t MT, typename T, typename A>
void bsr_mm_kernel(const A* xp, const int32_t* crow, const int32_t* col, const A* v, const T* bias, T* y,
                   int64_t M, int64_t K, int64_t N, int64_t bn, int64_t bk) {
  const int64_t rows = N / bn, tiles = (M + MT - 1) / MT;
  const int64_t avg_work = rows ? MT * (crow[rows] / rows + 1) * bn * bk : 1;
  // task = (M tile, block-row), block-row fastest: a thread's chunk reuses one packed x tile
  at::parallel_for(0, tiles * rows, grain_for(avg_work), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r = t % rows, m0 = (t / rows) * MT, mc = std::min(MT, M - m0);
      const A* xt = xp + (t / rows) * K * MT;
      const int64_t b0 = crow[r], b1 = crow[r + 1];
      for (int64_t i = 0; i < bn; ++i) {
        Tile<A, MT> acc;
        for (int64_t b = b0; b < b1; ++b) {
          const A* w = v + (b * bn + i) * bk;
          const A* xc = xt + int64_t(col[b]) * bk * MT;
          if constexpr (MT == 1) {
            acc.acc1 += dot(w, xc, bk);  // a single row of x: a contiguous dot along the block row
          } else {
            for (int64_t kk = 0; kk < bk; ++kk) acc.fma(w[kk], xc + kk * MT);
          }
        }
        const A bv = bias ? static_cast<A>(bias[r * bn + i]) : A(0);
        for (int64_t j = 0; j < mc; ++j) y[(m0 + j) * N + r * bn + i] = static_cast<T>(acc[j] + bv);
      }
    }
  });
}

// Block-CSC view of the pattern: the stored blocks of each block-column, block-rows ascending.
struct BlockColumns {
  std::vector<int64_t> ptr;    // [cols + 1]
  std::vector<int64_t> block;  // [nnzb] block id
  std::vector<int64_t> row;    // [nnzb] its block-row
};

BlockColumns block_columns(const int32_t* crow, const int32_t* col, int64_t rows, int64_t cols) {
  const int64_t nnzb = crow[rows];
  BlockColumns t{std::vector<int64_t>(cols + 1, 0), std::vector<int64_t>(nnzb), std::vector<int64_t>(nnzb)};
  for (int64_t b = 0; b < nnzb; ++b) ++t.ptr[col[b] + 1];
  for (int64_t c = 0; c < cols; ++c) t.ptr[c + 1] += t.ptr[c];
  std::vector<int64_t> next(t.ptr.begin(), t.ptr.end() - 1);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t b = crow[r]; b < crow[r + 1]; ++b) {
      const int64_t p = next[col[b]]++;
      t.block[p] = b;
      t.row[p] = r;
    }
  }
  return t;
}

// dx[m, c*bk + kk] = sum over blocks b of block-column c: dy[m, row_b*bn : +bn] . W_b[:, kk]
// Walking the block-columns gives each task its own tile of dx: no atomics, no private copies of dx.
template <int64_t MT, typename T, typename A>
void bsr_mm_t_kernel(const A* dyp, const int32_t* crow, const int32_t* col, const A* v, T* dx, int64_t M,
                     int64_t K, int64_t N, int64_t bn, int64_t bk) {
  const int64_t rows = N / bn, cols = K / bk, tiles = (M + MT - 1) / MT;
  const BlockColumns bc = block_columns(crow, col, rows, cols);
  const int64_t avg_work = cols ? MT * (crow[rows] / cols + 1) * bn * bk : 1;
  at::parallel_for(0, tiles * cols, grain_for(avg_work), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t c = t % cols, m0 = (t / cols) * MT, mc = std::min(MT, M - m0);
      const A* dyt = dyp + (t / cols) * N * MT;
      const int64_t p0 = bc.ptr[c], p1 = bc.ptr[c + 1];
      for (int64_t kk = 0; kk < bk; ++kk) {
        Tile<A, MT> acc;
        for (int64_t p = p0; p < p1; ++p) {
          const A* w = v + bc.block[p] * bn * bk + kk;  // column kk of the block, stride bk
          const A* d = dyt + bc.row[p] * bn * MT;
          for (int64_t i = 0; i < bn; ++i) acc.fma(w[i * bk], d + i * MT);
        }
        for (int64_t j = 0; j < mc; ++j) dx[(m0 + j) * K + c * bk + kk] = static_cast<T>(acc[j]);
      }
    }
  });
}

// out[b, i, kk] = dy[:, row_b*bn + i] . x[:, col_b*bk + kk], from transposed copies dyT [N, M], xT [K, M]
// so that every dot is contiguous over M.
template <typename T, typename A>
void bsr_sddmm_kernel(const A* dyT, const A* xT, const int32_t* crow, const int32_t* col, T* out, int64_t M,
                      int64_t N, int64_t bn, int64_t bk) {
  const int64_t rows = N / bn, nnzb = crow[rows];
  std::vector<int64_t> row_of(nnzb);
  for (int64_t r = 0; r < rows; ++r) std::fill(row_of.begin() + crow[r], row_of.begin() + crow[r + 1], r);
  at::parallel_for(0, nnzb, grain_for(M * bn * bk), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const A* d = dyT + row_of[b] * bn * M;
      const A* xc = xT + int64_t(col[b]) * bk * M;
      T* o = out + b * bn * bk;
      for (int64_t i = 0; i < bn; ++i)
        for (int64_t kk = 0; kk < bk; ++kk) o[i * bk + kk] = static_cast<T>(dot(d + i * M, xc + kk * M, M));
    }
  });
}

// Values (and transposed activations for sddmm) in the accumulation type: a no-op for float32/float64.
at::Tensor to_acc(const at::Tensor& t) { return t.to(at::toOpMathType(t.scalar_type())); }

// ------------------------------------------------------------------------------------------------ ops
at::Tensor bsr_mm(const at::Tensor& x_in, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                  const std::optional<at::Tensor>& bias_in, int64_t n) {
  constexpr const char* op = "sparsekit::bsr_mm";
  check_tensor(op, x_in, "x", 2);
  check_floating(op, x_in, "x");
  check_tensor(op, values, "values", 3);
  check_same_dtype(op, values, "values", x_in, "x");
  TORCH_CHECK(values.is_contiguous(), op, ": values must be contiguous");
  check_index(op, crow, "crow_indices");
  check_index(op, col, "col_indices");
  const int64_t bn = values.size(1), bk = values.size(2), M = x_in.size(0), K = x_in.size(1);
  check_block(op, bn, bk);
  TORCH_CHECK(n >= 0 && n % bn == 0, op, ": n (", n, ") must be a non-negative multiple of block_n=", bn);
  TORCH_CHECK(K % bk == 0, op, ": x.size(1) (K=", K, ") must be a multiple of block_k=", bk, " (values.size(2))");
  TORCH_CHECK(col.numel() == values.size(0), op, ": col_indices has ", col.numel(), " entries but values has ",
              values.size(0), " blocks");
  check_structure(op, crow, col, n / bn, K / bk);
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) {
    check_tensor(op, *bias_in, "bias", 1);
    check_same_dtype(op, *bias_in, "bias", x_in, "x");
    TORCH_CHECK(bias_in->size(0) == n, op, ": bias must have n=", n, " entries, got ", bias_in->size(0));
    bias = bias_in->contiguous();
  }
  const at::Tensor x = x_in.contiguous(), v = to_acc(values);
  at::Tensor y = at::empty({M, n}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sparsekit_bsr_mm", [&] {
    using A = at::opmath_type<scalar_t>;
    with_m_tile(M, [&](auto mt) {
      constexpr int64_t MT = decltype(mt)::value;
      const at::Tensor xp = pack_rows<MT, scalar_t, A>(x, M, K);
      bsr_mm_kernel<MT, scalar_t, A>(xp.const_data_ptr<A>(), crow.const_data_ptr<int32_t>(),
                                     col.const_data_ptr<int32_t>(), v.const_data_ptr<A>(),
                                     bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
                                     y.mutable_data_ptr<scalar_t>(), M, K, n, bn, bk);
    });
  });
  return y;
}

at::Tensor bsr_mm_t(const at::Tensor& dy_in, const at::Tensor& crow, const at::Tensor& col,
                    const at::Tensor& values, int64_t k) {
  constexpr const char* op = "sparsekit::bsr_mm_t";
  check_tensor(op, dy_in, "dy", 2);
  check_floating(op, dy_in, "dy");
  check_tensor(op, values, "values", 3);
  check_same_dtype(op, values, "values", dy_in, "dy");
  TORCH_CHECK(values.is_contiguous(), op, ": values must be contiguous");
  check_index(op, crow, "crow_indices");
  check_index(op, col, "col_indices");
  const int64_t bn = values.size(1), bk = values.size(2), M = dy_in.size(0), N = dy_in.size(1);
  check_block(op, bn, bk);
  TORCH_CHECK(N % bn == 0, op, ": dy.size(1) (N=", N, ") must be a multiple of block_n=", bn, " (values.size(1))");
  TORCH_CHECK(k >= 0 && k % bk == 0, op, ": k (", k, ") must be a non-negative multiple of block_k=", bk);
  TORCH_CHECK(col.numel() == values.size(0), op, ": col_indices has ", col.numel(), " entries but values has ",
              values.size(0), " blocks");
  check_structure(op, crow, col, N / bn, k / bk);
  const at::Tensor dy = dy_in.contiguous(), v = to_acc(values);
  at::Tensor dx = at::empty({M, k}, dy.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "sparsekit_bsr_mm_t", [&] {
    using A = at::opmath_type<scalar_t>;
    with_m_tile(M, [&](auto mt) {
      constexpr int64_t MT = decltype(mt)::value;
      const at::Tensor dyp = pack_rows<MT, scalar_t, A>(dy, M, N);
      bsr_mm_t_kernel<MT, scalar_t, A>(dyp.const_data_ptr<A>(), crow.const_data_ptr<int32_t>(),
                                       col.const_data_ptr<int32_t>(), v.const_data_ptr<A>(),
                                       dx.mutable_data_ptr<scalar_t>(), M, k, N, bn, bk);
    });
  });
  return dx;
}

at::Tensor bsr_sddmm(const at::Tensor& dy_in, const at::Tensor& x_in, const at::Tensor& crow, const at::Tensor& col,
                     int64_t block_n, int64_t block_k) {
  constexpr const char* op = "sparsekit::bsr_sddmm";
  check_tensor(op, dy_in, "dy", 2);
  check_floating(op, dy_in, "dy");
  check_tensor(op, x_in, "x", 2);
  check_same_dtype(op, x_in, "x", dy_in, "dy");
  check_index(op, crow, "crow_indices");
  check_index(op, col, "col_indices");
  check_block(op, block_n, block_k);
  const int64_t M = dy_in.size(0), N = dy_in.size(1), K = x_in.size(1);
  TORCH_CHECK(x_in.size(0) == M, op, ": x and dy must have the same number of rows M, got x.size(0)=",
              x_in.size(0), " and dy.size(0)=", M);
  TORCH_CHECK(N % block_n == 0, op, ": dy.size(1) (N=", N, ") must be a multiple of block_n=", block_n);
  TORCH_CHECK(K % block_k == 0, op, ": x.size(1) (K=", K, ") must be a multiple of block_k=", block_k);
  check_structure(op, crow, col, N / block_n, K / block_k);
  const at::Tensor dyT = to_acc(dy_in.t()).contiguous(), xT = to_acc(x_in.t()).contiguous();
  at::Tensor out = at::empty({col.numel(), block_n, block_k}, dy_in.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy_in.scalar_type(), "sparsekit_bsr_sddmm", [&] {
    using A = at::opmath_type<scalar_t>;
    bsr_sddmm_kernel<scalar_t, A>(dyT.const_data_ptr<A>(), xT.const_data_ptr<A>(), crow.const_data_ptr<int32_t>(),
                                  col.const_data_ptr<int32_t>(), out.mutable_data_ptr<scalar_t>(), M, N, block_n,
                                  block_k);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekit, CPU, m) {
  m.impl("bsr_mm", &bsr_mm);
  m.impl("bsr_mm_t", &bsr_mm_t);
  m.impl("bsr_sddmm", &bsr_sddmm);
}
