// CUDA kernels for the BSR ops (schemas and semantics in csrc/ops.cpp); any block shape up to 128x128,
// float32/float64/float16/bfloat16, 16-bit types accumulate in fp32 (at::opmath_type).
//
//   bsr_mm     y  = x @ W^T + bias   one thread block per (block-row, M tile)
//                                    (fp16/bf16 with square 16/32/64 blocks: tensor cores, bsr_mm_tc.cu,
//                                    after a first-use self-check against the generic kernel, selfcheck.cuh)
//   bsr_mm_t   dx = dy @ W           one thread block per (block-column, M tile), through a block-CSC view of
//                                    W built on the device (stable sort of col_indices): no atomics, and the
//                                    summation order is deterministic
//   bsr_sddmm  dW = dy^T @ x on W's blocks: one thread block per (stored block, chunk of its rows)
//
// bsr_mm and bsr_mm_t share one kernel: each output tile out[m0:m0+TM, o*OB:(o+1)*OB] is a dense product
// over a "gathered" reduction axis, the concatenation of the stored blocks of block-row (or block-column) o.
// Walking that axis in KC-wide chunks, independent of the block boundaries, keeps tiny blocks (1x4, 4x1,
// 1x1) from costing one __syncthreads() per block. Both operands of a chunk are staged in shared memory.
//
// Index data is trusted here (checking it would need a device sync); sparsekit.formats validates it.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.cuh"

#include <algorithm>
#include <climits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "bsr_mm_tc.cuh"
#include "selfcheck.cuh"

namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = 8;                      // outputs per thread
constexpr int kMaxOut = kThreads * kPerThread;     // outputs per thread block
constexpr int kMaxBlock = 128;                     // sparsekit.formats.MAX_BLOCK
constexpr int kMaxTM = 64;                         // rows of x per thread block

// Reduction chunk: 32 for fp32 accumulation, 16 for fp64, so the static shared memory stays ~26 KB.
template <typename A>
struct Chunk {
  static constexpr int value = sizeof(A) == 8 ? 16 : 32;
};

// The kPerThread outputs of thread tid in a thread block's tile of n_out outputs, `width` per row: output
// tid + s*kThreads is (row_of[s], col_of[s]) ((0, 0) past n_out; the caller skips those), acc zeroed.
template <typename A>
__device__ __forceinline__ void thread_outputs(int tid, int n_out, int width, int (&row_of)[kPerThread],
                                               int (&col_of)[kPerThread], A (&acc)[kPerThread]) {
#pragma unroll
  for (int s = 0; s < kPerThread; ++s) {
    const int idx = tid + s * kThreads;
    row_of[s] = idx < n_out ? idx / width : 0;
    col_of[s] = idx < n_out ? idx % width : 0;
    acc[s] = A(0);
  }
}

// ------------------------------------------------------------------------------------------ kernels
// out[m, o*OB + p] = sum_j in[m, a_col(j)] * B(j, p) (+ bias[o*OB + p]) over the gathered axis j of segment o.
// Segment o holds stored blocks q in [ptr[o], ptr[o+1]), each contributing seg_len = (kTrans ? bn : bk)
// reduction elements s. With b = (kTrans ? blk_of[q] : q):
//   forward (kTrans = false): OB = bn, a_col = col[b]*bk + s,  B(j, p) = values[b, p, s]   (base_of = col)
//   mm_t    (kTrans = true):  OB = bk, a_col = brow[b]*bn + s, B(j, p) = values[b, s, p]   (base_of = brow)
template <typename T, typename A, bool kTrans>
__global__ void __launch_bounds__(kThreads)
bsr_gathered_gemm_kernel(const T* __restrict__ in, const int32_t* __restrict__ ptr,
                         const int32_t* __restrict__ blk_of, const int32_t* __restrict__ base_of,
                         const T* __restrict__ values, const T* __restrict__ bias, T* __restrict__ out, int64_t M,
                         int64_t in_cols, int64_t out_cols, int bn, int bk, int64_t segments, int tm) {
  constexpr int KC = Chunk<A>::value;
  __shared__ A a_tile[kMaxTM][KC + 1];     // +1: rows start on different banks
  __shared__ A b_tile[kMaxBlock][KC + 1];

  const int OB = kTrans ? bk : bn, seg_len = kTrans ? bn : bk;
  const int64_t o = blockIdx.x % segments, m0 = (blockIdx.x / segments) * tm;
  const int64_t q0 = ptr[o];
  const int64_t len = (int64_t(ptr[o + 1]) - q0) * seg_len;
  const int64_t block_elems = int64_t(bn) * bk;
  const int tid = threadIdx.x, n_out = tm * OB;

  int row_of[kPerThread], col_of[kPerThread];
  A acc[kPerThread];
  thread_outputs(tid, n_out, OB, row_of, col_of, acc);

  for (int64_t j0 = 0; j0 < len; j0 += KC) {
    // stage in[m0:m0+tm, a_col(j0:j0+KC)]: consecutive threads read consecutive columns of a block
    for (int idx = tid; idx < tm * KC; idx += kThreads) {
      const int mi = idx / KC, jj = idx % KC;
      const int64_t j = j0 + jj, m = m0 + mi;
      A v = A(0);
      if (j < len && m < M) {
        const int64_t q = q0 + j / seg_len, s = j % seg_len;
        const int64_t b = kTrans ? int64_t(blk_of[q]) : q;
        v = static_cast<A>(in[m * in_cols + int64_t(base_of[b]) * seg_len + s]);
      }
      a_tile[mi][jj] = v;
    }
    // stage B(j0:j0+KC, 0:OB); the thread order follows the contiguous axis of values
    for (int idx = tid; idx < OB * KC; idx += kThreads) {
      const int p = kTrans ? idx % OB : idx / KC, jj = kTrans ? idx / OB : idx % KC;
      const int64_t j = j0 + jj;
      A v = A(0);
      if (j < len) {
        const int64_t q = q0 + j / seg_len, s = j % seg_len;
        const int64_t b = kTrans ? int64_t(blk_of[q]) : q;
        v = static_cast<A>(values[b * block_elems + (kTrans ? s * bk + p : p * bk + s)]);
      }
      b_tile[p][jj] = v;
    }
    __syncthreads();
#pragma unroll 4
    for (int jj = 0; jj < KC; ++jj) {
#pragma unroll
      for (int s = 0; s < kPerThread; ++s) acc[s] += a_tile[row_of[s]][jj] * b_tile[col_of[s]][jj];
    }
    __syncthreads();
  }

#pragma unroll
  for (int s = 0; s < kPerThread; ++s) {
    const int idx = tid + s * kThreads;
    const int64_t m = m0 + row_of[s];
    if (idx < n_out && m < M) {
      const int64_t c = o * OB + col_of[s];
      const A bv = bias != nullptr ? static_cast<A>(bias[c]) : A(0);
      out[m * out_cols + c] = static_cast<T>(acc[s] + bv);
    }
  }
}

// brow[b] = block-row of stored block b.
__global__ void block_rows_kernel(const int32_t* __restrict__ crow, int32_t* __restrict__ brow, int64_t rows) {
  const int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (r < rows) {
    for (int32_t b = crow[r]; b < crow[r + 1]; ++b) brow[b] = static_cast<int32_t>(r);
  }
}

// out[b, i, kk] = sum_m dy[m, brow[b]*bn + i] * x[m, col[b]*bk + kk]; thread block = (stored block b,
// rows [i0, i0+ib) of it), M walked in KC-row chunks staged in shared memory.
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
bsr_sddmm_kernel(const T* __restrict__ dy, const T* __restrict__ x, const int32_t* __restrict__ brow,
                 const int32_t* __restrict__ col, T* __restrict__ out, int64_t M, int64_t N, int64_t K, int bn,
                 int bk, int ib, int64_t chunks) {
  constexpr int KC = Chunk<A>::value;
  __shared__ A dy_tile[KC][kMaxBlock + 1];
  __shared__ A x_tile[KC][kMaxBlock + 1];

  const int64_t b = blockIdx.x / chunks;
  const int i0 = static_cast<int>(blockIdx.x % chunks) * ib;
  const int rows_here = min(ib, bn - i0), n_out = rows_here * bk;
  const int64_t dy_col = int64_t(brow[b]) * bn + i0, x_col = int64_t(col[b]) * bk;
  const int tid = threadIdx.x;

  int row_of[kPerThread], col_of[kPerThread];
  A acc[kPerThread];
  thread_outputs(tid, n_out, bk, row_of, col_of, acc);

  for (int64_t m0 = 0; m0 < M; m0 += KC) {
    for (int idx = tid; idx < KC * rows_here; idx += kThreads) {
      const int mm = idx / rows_here, ii = idx % rows_here;
      const int64_t m = m0 + mm;
      dy_tile[mm][ii] = m < M ? static_cast<A>(dy[m * N + dy_col + ii]) : A(0);
    }
    for (int idx = tid; idx < KC * bk; idx += kThreads) {
      const int mm = idx / bk, kk = idx % bk;
      const int64_t m = m0 + mm;
      x_tile[mm][kk] = m < M ? static_cast<A>(x[m * K + x_col + kk]) : A(0);
    }
    __syncthreads();
#pragma unroll 4
    for (int mm = 0; mm < KC; ++mm) {
#pragma unroll
      for (int s = 0; s < kPerThread; ++s) acc[s] += dy_tile[mm][row_of[s]] * x_tile[mm][col_of[s]];
    }
    __syncthreads();
  }

  T* o = out + b * int64_t(bn) * bk + int64_t(i0) * bk;
#pragma unroll
  for (int s = 0; s < kPerThread; ++s) {
    const int idx = tid + s * kThreads;
    if (idx < n_out) o[idx] = static_cast<T>(acc[s]);
  }
}

// ------------------------------------------------------------------------------------------- checks
using sparsekit_cuda::check_cuda;
using sparsekit_cuda::check_floating;
using sparsekit_cuda::check_same_dtype;
using sparsekit_cuda::checked_bias;
using sparsekit_cuda::grid_size;

void check_index(const char* op, const at::Tensor& t, const char* name, const at::Tensor& ref) {
  check_cuda(op, t, name, 1, ref);
  TORCH_CHECK(t.scalar_type() == at::kInt, op, ": ", name, " must have dtype torch.int32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

void check_block(const char* op, int64_t bn, int64_t bk) {
  TORCH_CHECK(bn >= 1 && bn <= kMaxBlock && bk >= 1 && bk <= kMaxBlock, op, ": block (", bn, ", ", bk,
              ") must have both sides in [1, ", kMaxBlock, "]");
}

void check_values(const char* op, const at::Tensor& values, const at::Tensor& col, const at::Tensor& ref,
                  const char* ref_name) {
  check_cuda(op, values, "values", 3, ref);
  check_same_dtype(op, values, "values", ref, ref_name);
  TORCH_CHECK(values.is_contiguous(), op, ": values must be contiguous");
  TORCH_CHECK(col.numel() == values.size(0), op, ": col_indices has ", col.numel(), " entries but values has ",
              values.size(0), " blocks");
  check_block(op, values.size(1), values.size(2));
}

at::Tensor block_rows(const at::Tensor& crow, int64_t rows, int64_t nnzb, cudaStream_t stream) {
  at::Tensor brow = at::empty({nnzb}, crow.options());
  if (rows > 0 && nnzb > 0) {
    block_rows_kernel<<<grid_size("block_rows", (rows + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
        crow.const_data_ptr<int32_t>(), brow.mutable_data_ptr<int32_t>(), rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return brow;
}

// Rows of x per thread block: as many as keep tm * OB <= kMaxOut outputs.
int rows_per_tile(int out_block) { return std::min(kMaxTM, std::max(1, kMaxOut / out_block)); }

// y = x @ W^T (+ bias) on the generic CUDA-core kernel; x, y contiguous, M > 0, rows > 0.
void bsr_mm_generic(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                    const at::Tensor& bias, at::Tensor& y, int64_t n, cudaStream_t stream) {
  constexpr const char* op = "sparsekit::bsr_mm";
  const int64_t bn = values.size(1), bk = values.size(2), M = x.size(0), K = x.size(1), rows = n / bn;
  const int tm = rows_per_tile(static_cast<int>(bn));
  const int64_t mtiles = (M + tm - 1) / tm;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sparsekit_bsr_mm_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    bsr_gathered_gemm_kernel<scalar_t, A, false><<<grid_size(op, rows * mtiles), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), crow.const_data_ptr<int32_t>(), nullptr, col.const_data_ptr<int32_t>(),
        values.const_data_ptr<scalar_t>(), bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
        y.mutable_data_ptr<scalar_t>(), M, K, n, static_cast<int>(bn), static_cast<int>(bk), rows, tm);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// First-use self-check of the tensor-core path (selfcheck.cuh): for fp16 and bf16 and blocks 16/32/64, a
// problem with an M tail, an empty block-row and a bias, whose entries are small multiples of 1/8 and 1/4
// (exact in both dtypes, sums exact in fp32), run through both kernels and compared.
std::string bsr_tc_probe(const at::Device& device, cudaStream_t stream) {
  const int64_t row_blocks[5][3] = {{0, 2, -1}, {-1, -1, -1}, {1, -1, -1}, {0, 1, 2}, {2, -1, -1}};
  for (const auto dtype : {at::kHalf, at::kBFloat16}) {
    for (const int64_t B : {16, 32, 64}) {
      const int64_t M = 37, K = 3 * B, rows = 5, n = rows * B;
      std::vector<int32_t> crow_h{0}, col_h;
      for (const auto& r : row_blocks) {
        for (const int64_t c : r) {
          if (c >= 0) col_h.push_back(static_cast<int32_t>(c));
        }
        crow_h.push_back(static_cast<int32_t>(col_h.size()));
      }
      const auto i32 = at::TensorOptions().dtype(at::kInt);
      const at::Tensor crow = at::from_blob(crow_h.data(), {rows + 1}, i32).to(device);
      const at::Tensor col = at::from_blob(col_h.data(), {static_cast<int64_t>(col_h.size())}, i32).to(device);
      const auto f32 = at::TensorOptions().dtype(at::kFloat).device(device);
      const int64_t nnzb = static_cast<int64_t>(col_h.size());
      const at::Tensor values =
          ((at::arange(nnzb * B * B, f32).remainder(7) - 3) * 0.25).view({nnzb, B, B}).to(dtype);
      const at::Tensor x = ((at::arange(M * K, f32).mul(3).remainder(11) - 5) * 0.125).view({M, K}).to(dtype);
      const at::Tensor bias = ((at::arange(n, f32).remainder(5) - 2) * 0.5).to(dtype);
      at::Tensor y_tc = at::empty({M, n}, x.options());
      at::Tensor y_ref = at::empty({M, n}, x.options());
      if (!sparsekit_cuda::bsr_mm_tensor_core(x, crow, col, values, bias, y_tc, rows, stream)) continue;
      bsr_mm_generic(x, crow, col, values, bias, y_ref, n, stream);
      const std::string mismatch = sparsekit_cuda::probe_mismatch(
          y_tc, y_ref, 1e-2f, std::string(sparsekit_cuda::probe_dtype_name(dtype)) + " block " + std::to_string(B));
      if (!mismatch.empty()) return mismatch;
    }
  }
  return "";
}

struct BsrTensorCoreTag {};

// -------------------------------------------------------------------------------------------------- ops
at::Tensor bsr_mm_cuda(const at::Tensor& x_in, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                       const std::optional<at::Tensor>& bias_in, int64_t n) {
  constexpr const char* op = "sparsekit::bsr_mm";
  check_cuda(op, x_in, "x", 2, x_in);
  check_floating(op, x_in, "x");
  check_index(op, crow, "crow_indices", x_in);
  check_index(op, col, "col_indices", x_in);
  check_values(op, values, col, x_in, "x");
  const int64_t bn = values.size(1), bk = values.size(2), M = x_in.size(0), K = x_in.size(1);
  TORCH_CHECK(n >= 0 && n % bn == 0, op, ": n (", n, ") must be a non-negative multiple of block_n=", bn);
  TORCH_CHECK(K % bk == 0, op, ": x.size(1) (K=", K, ") must be a multiple of block_k=", bk, " (values.size(2))");
  const int64_t rows = n / bn;
  TORCH_CHECK(crow.numel() == rows + 1, op, ": crow_indices must have N/block_n + 1 = ", rows + 1, " entries, got ",
              crow.numel());
  const at::Tensor bias = checked_bias(op, bias_in, x_in, "x", n, "n=");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty({M, n}, x.options());
  if (M == 0 || rows == 0) return y;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // fp16/bf16 with square 16/32/64 blocks: mma.sync tensor cores (bsr_mm_tc.cu), once its self-check passed
  const bool tc_candidate = (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16) && bn == bk;
  if (tc_candidate &&
      sparsekit_cuda::path_enabled<BsrTensorCoreTag>("SPARSEKIT_BSR_TC", x.get_device(),
                                                     [&] { return bsr_tc_probe(x.device(), stream); }) &&
      sparsekit_cuda::bsr_mm_tensor_core(x, crow, col, values, bias, y, rows, stream)) {
    return y;
  }
  bsr_mm_generic(x, crow, col, values, bias, y, n, stream);
  return y;
}

at::Tensor bsr_mm_t_cuda(const at::Tensor& dy_in, const at::Tensor& crow, const at::Tensor& col,
                         const at::Tensor& values, int64_t k) {
  constexpr const char* op = "sparsekit::bsr_mm_t";
  check_cuda(op, dy_in, "dy", 2, dy_in);
  check_floating(op, dy_in, "dy");
  check_index(op, crow, "crow_indices", dy_in);
  check_index(op, col, "col_indices", dy_in);
  check_values(op, values, col, dy_in, "dy");
  const int64_t bn = values.size(1), bk = values.size(2), M = dy_in.size(0), N = dy_in.size(1);
  TORCH_CHECK(N % bn == 0, op, ": dy.size(1) (N=", N, ") must be a multiple of block_n=", bn, " (values.size(1))");
  TORCH_CHECK(k >= 0 && k % bk == 0, op, ": k (", k, ") must be a non-negative multiple of block_k=", bk);
  const int64_t rows = N / bn, cols = k / bk, nnzb = col.numel();
  TORCH_CHECK(crow.numel() == rows + 1, op, ": crow_indices must have N/block_n + 1 = ", rows + 1, " entries, got ",
              crow.numel());
  const c10::cuda::CUDAGuard guard(dy_in.device());
  const at::Tensor dy = dy_in.contiguous();
  if (M == 0 || cols == 0 || nnzb == 0) return at::zeros({M, k}, dy.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // block-CSC: blocks ordered by block-column (stable, so block-rows stay ascending inside a column)
  const auto sorted = at::sort(col, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor order = std::get<1>(sorted).to(at::kInt);
  const at::Tensor col_ptr =
      at::searchsorted(std::get<0>(sorted), at::arange(cols + 1, col.options()), /*out_int32=*/true);
  const at::Tensor brow = block_rows(crow, rows, nnzb, stream);
  at::Tensor dx = at::empty({M, k}, dy.options());
  const int tm = rows_per_tile(static_cast<int>(bk));
  const int64_t mtiles = (M + tm - 1) / tm;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "sparsekit_bsr_mm_t_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    bsr_gathered_gemm_kernel<scalar_t, A, true><<<grid_size(op, cols * mtiles), kThreads, 0, stream>>>(
        dy.const_data_ptr<scalar_t>(), col_ptr.const_data_ptr<int32_t>(), order.const_data_ptr<int32_t>(),
        brow.const_data_ptr<int32_t>(), values.const_data_ptr<scalar_t>(), nullptr, dx.mutable_data_ptr<scalar_t>(),
        M, N, k, static_cast<int>(bn), static_cast<int>(bk), cols, tm);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dx;
}

at::Tensor bsr_sddmm_cuda(const at::Tensor& dy_in, const at::Tensor& x_in, const at::Tensor& crow,
                          const at::Tensor& col, int64_t block_n, int64_t block_k) {
  constexpr const char* op = "sparsekit::bsr_sddmm";
  check_cuda(op, dy_in, "dy", 2, dy_in);
  check_floating(op, dy_in, "dy");
  check_cuda(op, x_in, "x", 2, dy_in);
  check_same_dtype(op, x_in, "x", dy_in, "dy");
  check_index(op, crow, "crow_indices", dy_in);
  check_index(op, col, "col_indices", dy_in);
  check_block(op, block_n, block_k);
  const int64_t M = dy_in.size(0), N = dy_in.size(1), K = x_in.size(1), nnzb = col.numel();
  TORCH_CHECK(x_in.size(0) == M, op, ": x and dy must have the same number of rows M, got x.size(0)=", x_in.size(0),
              " and dy.size(0)=", M);
  TORCH_CHECK(N % block_n == 0, op, ": dy.size(1) (N=", N, ") must be a multiple of block_n=", block_n);
  TORCH_CHECK(K % block_k == 0, op, ": x.size(1) (K=", K, ") must be a multiple of block_k=", block_k);
  const int64_t rows = N / block_n;
  TORCH_CHECK(crow.numel() == rows + 1, op, ": crow_indices must have N/block_n + 1 = ", rows + 1, " entries, got ",
              crow.numel());
  const c10::cuda::CUDAGuard guard(dy_in.device());
  const at::Tensor dy = dy_in.contiguous(), x = x_in.contiguous();
  at::Tensor out = at::empty({nnzb, block_n, block_k}, dy.options());
  if (nnzb == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor brow = block_rows(crow, rows, nnzb, stream);
  const int bn = static_cast<int>(block_n), bk = static_cast<int>(block_k);
  const int ib = std::min(bn, std::max(1, kMaxOut / bk));  // rows of a block per thread block
  const int64_t chunks = (bn + ib - 1) / ib;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "sparsekit_bsr_sddmm_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    bsr_sddmm_kernel<scalar_t, A><<<grid_size(op, nnzb * chunks), kThreads, 0, stream>>>(
        dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), brow.const_data_ptr<int32_t>(),
        col.const_data_ptr<int32_t>(), out.mutable_data_ptr<scalar_t>(), M, N, K, bn, bk, ib, chunks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekit, CUDA, m) {
  m.impl("bsr_mm", &bsr_mm_cuda);
  m.impl("bsr_mm_t", &bsr_mm_t_cuda);
  m.impl("bsr_sddmm", &bsr_sddmm_cuda);
}
