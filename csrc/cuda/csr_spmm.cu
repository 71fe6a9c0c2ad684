// CUDA kernels for the CSR ops (schemas and semantics in csrc/ops.cpp): unstructured sparsity, float32/float64/
// float16/bfloat16, 16-bit types accumulate in fp32 (at::opmath_type), col_indices int16 (K <= 32768) or int32.
//
//   csr_mm     y = x @ W^T + bias. fp16/bf16 with M <= 64 (decode) and 50-91% sparsity on compute capability
//     >= 8.0: first the tensor-core "load sparse, compute dense" path of csr_skinny.cu (Flash-LLM style: W's
//     tiles expanded in shared memory, mma.sync; see csr_skinny.cuh for the exact rule and the
//     SPARSEKIT_CSR_SKINNY switch), once its first-use self-check against the kernels below passed
//     (selfcheck.cuh). Otherwise, or when it declines, two kernels picked by M. These thresholds are the op's
//     own rule, untuned; where the dispatcher measures, it times each kernel per shape through csr_mm_variant
//     (below: the same op on a named kernel) and keeps the fastest:
//     M <= kRowDotMaxM (decode): csr_spmm_rowdot_kernel, one warp per sparse row, lanes over its nonzeros,
//       x read row-major as given, one shuffle reduction per row of x.
//     otherwise: csr_spmm_tiled_kernel, after Sputnik (Gale et al., SC'20), computing yT = W @ xT:
//       - row swizzle: rows visited in order of decreasing length (a stable device sort of the row lengths,
//         once per call; the schema has no place to cache it per weight), so the subwarps of one thread block
//         get rows of similar length and the longest rows start first;
//       - subwarp tiling: a subwarp of `sub` lanes (4, 8, 16 or 32, the smallest covering M) owns one sparse
//         row and sub*V columns of xT, V = 16 bytes / sizeof(T), so small M does not idle whole warps;
//       - vector loads: xT is a transposed copy of x padded to Mp (a multiple of V) columns, each lane loads
//         V contiguous elements with one 16-byte load; the sparse row is staged through shared memory in strips
//         of sub*4 entries, 4 values + 4 column indices per lane in one vector load each;
//       - reverse-offset alignment: a strip starts at the row start rounded down to a multiple of 4 so the
//         vector loads are aligned; the entries before the row start are loaded but skipped (not zeroed: a
//         0 * inf from x would make NaN), so no scalar prologue is needed;
//       - 16-bit column indices are read as int16 (half the index traffic) where K allows.
//     The result yT [N, Mp] is transposed back (one extra pass over y; the price of coalesced x loads).
//   csr_mm_t   dx = dy @ W: the same SpMM on W^T, whose CSR (= W's CSC) is built on the device with torch ops
//              (stable sort of the column indices, searchsorted for the pointers, gathers of rows and values);
//              no atomics, deterministic summation order. Row indices of W^T are int16 when N <= 32768.
//   csr_sddmm  dW = (dy^T @ x) on W's pattern: the entry-wise kernels of sddmm.cuh (a thread per entry for
//              M <= 32, else a warp per 4 entries over transposed copies of dy and x).
//
// Index data is trusted here (checking it would need a device sync); sparsekit.formats validates it.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.cuh"
#include "csr_skinny.cuh"

#include <algorithm>
#include <climits>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>

#include "sddmm.cuh"

namespace {

constexpr int kThreads = 128;
constexpr int kStripPerLane = 4;  // sparse entries each lane stages per strip (one vector load)
// Largest M of the row-dot kernel (its accumulators are registers). Below it the op's own rule takes that
// kernel: an untuned threshold that serves only where the dispatcher does not measure (it times the kernels per
// shape through csr_mm_variant, see below).
constexpr int kRowDotMaxM = 8;

// Which kernel runs csr_mm: kAuto is the op's rule (skinny path when csr_skinny.cuh says it applies, else
// row-dot for M <= kRowDotMaxM, else tiled); the others name one (sparsekit::csr_mm_variant).
enum class CsrKernel { kAuto, kSkinny, kRowDot, kTiled };

// out[q] = p[q] for q < 4; one 8/16-byte load (two 16-byte loads for 8-byte T) when `vec`, p then aligned.
template <typename T, typename Out>
__device__ __forceinline__ void load4(const T* __restrict__ p, Out (&out)[4]) {
  constexpr int kBytes = 4 * static_cast<int>(sizeof(T));
  if constexpr (kBytes == 8) {
    const uint2 u = *reinterpret_cast<const uint2*>(p);
    const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int q = 0; q < 4; ++q) out[q] = static_cast<Out>(e[q]);
  } else if constexpr (kBytes % 16 == 0) {
    uint4 u[kBytes / 16];
#pragma unroll
    for (int i = 0; i < kBytes / 16; ++i) u[i] = reinterpret_cast<const uint4*>(p)[i];
    const T* e = reinterpret_cast<const T*>(u);
#pragma unroll
    for (int q = 0; q < 4; ++q) out[q] = static_cast<Out>(e[q]);
  } else {
#pragma unroll
    for (int q = 0; q < 4; ++q) out[q] = static_cast<Out>(p[q]);
  }
}

// ------------------------------------------------------------------------------------------ kernels
// yT[r, :] = sum_e val[e] * xT[col[e], :] (+ bias[r]) over the entries e of row r = order[slot].
// Thread block: kThreads / sub subwarps (slots), each covering columns [mt*sub*V, (mt+1)*sub*V) of xT.
template <typename T, typename A, typename I>
__global__ void __launch_bounds__(kThreads)
csr_spmm_tiled_kernel(const T* __restrict__ xT, const int32_t* __restrict__ crow, const I* __restrict__ col,
                      const T* __restrict__ val, const int32_t* __restrict__ order, const T* __restrict__ bias,
                      T* __restrict__ yT, int64_t N, int64_t Mp, int sub, int64_t mtiles, bool vec_sparse) {
  constexpr int V = VecWidth<T>::value;
  __shared__ A s_val[kThreads * kStripPerLane];
  __shared__ int32_t s_col[kThreads * kStripPerLane];

  const int tid = threadIdx.x, lane = tid % sub, sw = tid / sub;
  const int strip = sub * kStripPerLane;
  A* my_val = s_val + (tid - lane) * kStripPerLane;  // this subwarp's strip
  int32_t* my_col = s_col + (tid - lane) * kStripPerLane;
  const unsigned mask = sub == 32 ? 0xffffffffu : ((1u << sub) - 1u) << ((tid & 31) - lane);

  const int64_t slot = (blockIdx.x / mtiles) * (kThreads / sub) + sw;
  const int64_t mt = blockIdx.x % mtiles;
  if (slot >= N) return;  // the whole subwarp leaves: its __syncwarp(mask) below never waits on it
  const int64_t r = order[slot];
  const int64_t start = crow[r], end = crow[r + 1];
  const int64_t m0 = (mt * sub + lane) * V;
  const bool active = m0 < Mp;

  A acc[V];
#pragma unroll
  for (int v = 0; v < V; ++v) acc[v] = A(0);

  const int64_t first = vec_sparse ? (start & ~int64_t(kStripPerLane - 1)) : start;  // reverse offset
  for (int64_t p = first; p < end; p += strip) {
    const int64_t q0 = p + int64_t(lane) * kStripPerLane;
    if (vec_sparse && q0 + kStripPerLane <= end) {
      A v4[4];
      int32_t c4[4];
      load4<T, A>(val + q0, v4);
      load4<I, int32_t>(col + q0, c4);
#pragma unroll
      for (int q = 0; q < kStripPerLane; ++q) {
        my_val[lane * kStripPerLane + q] = v4[q];
        my_col[lane * kStripPerLane + q] = c4[q];
      }
    } else {
#pragma unroll
      for (int q = 0; q < kStripPerLane; ++q) {
        if (q0 + q < end) {
          my_val[lane * kStripPerLane + q] = static_cast<A>(val[q0 + q]);
          my_col[lane * kStripPerLane + q] = static_cast<int32_t>(col[q0 + q]);
        }
      }
    }
    __syncwarp(mask);
    const int jlo = p < start ? static_cast<int>(start - p) : 0;
    const int jhi = static_cast<int>(std::min<int64_t>(strip, end - p));
    if (active) {
#pragma unroll 4
      for (int j = jlo; j < jhi; ++j) {
        const A w = my_val[j];
        A xv[V];
        load_vec<T, A, V>(xT + int64_t(my_col[j]) * Mp + m0, xv);
#pragma unroll
        for (int v = 0; v < V; ++v) acc[v] += w * xv[v];
      }
    }
    __syncwarp(mask);
  }

  if (active) {
    const A b = bias != nullptr ? static_cast<A>(bias[r]) : A(0);
    alignas(16) T out[V];
#pragma unroll
    for (int v = 0; v < V; ++v) out[v] = static_cast<T>(acc[v] + b);
    *reinterpret_cast<uint4*>(yT + r * Mp + m0) = *reinterpret_cast<const uint4*>(out);
  }
}

// y[i, r] = sum_e val[e] * x[i, col[e]] (+ bias[r]) for i < M <= kRowDotMaxM; one warp per row r = order[slot].
template <typename T, typename A, typename I>
__global__ void __launch_bounds__(kThreads)
csr_spmm_rowdot_kernel(const T* __restrict__ x, const int32_t* __restrict__ crow, const I* __restrict__ col,
                       const T* __restrict__ val, const int32_t* __restrict__ order, const T* __restrict__ bias,
                       T* __restrict__ y, int64_t M, int64_t N, int64_t K) {
  const int lane = threadIdx.x & 31;
  const int64_t slot = blockIdx.x * int64_t(kThreads / 32) + (threadIdx.x >> 5);
  if (slot >= N) return;  // per warp
  const int64_t r = order[slot];
  const int64_t start = crow[r], end = crow[r + 1];
  A acc[kRowDotMaxM];
#pragma unroll
  for (int i = 0; i < kRowDotMaxM; ++i) acc[i] = A(0);
  for (int64_t e = start + lane; e < end; e += 32) {
    const A w = static_cast<A>(val[e]);
    const int64_t c = col[e];
#pragma unroll
    for (int i = 0; i < kRowDotMaxM; ++i) {
      if (i < M) acc[i] += w * static_cast<A>(x[i * K + c]);
    }
  }
  const A b = bias != nullptr ? static_cast<A>(bias[r]) : A(0);
#pragma unroll
  for (int i = 0; i < kRowDotMaxM; ++i) {
    if (i < M) {  // uniform across the warp
      const A s = warp_sum(acc[i]);
      if (lane == 0) y[i * N + r] = static_cast<T>(s + b);
    }
  }
}

// row_of[e] = the row of entry e.
__global__ void csr_row_of_kernel(const int32_t* __restrict__ crow, int32_t* __restrict__ row_of, int64_t rows,
                                  int64_t nnz) {
  const int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (e < nnz) row_of[e] = static_cast<int32_t>(csr_row_of(crow, rows, e));
}

// ------------------------------------------------------------------------------------------- checks
using sparsekit_cuda::check_cuda;
using sparsekit_cuda::check_floating;
using sparsekit_cuda::check_same_dtype;
using sparsekit_cuda::checked_bias;
using sparsekit_cuda::grid_size;

void check_csr_index(const char* op, const at::Tensor& crow, const at::Tensor& col, int64_t rows, int64_t cols,
                     const at::Tensor& ref) {
  check_cuda(op, crow, "crow_indices", 1, ref);
  TORCH_CHECK(crow.scalar_type() == at::kInt, op, ": crow_indices must have dtype torch.int32, got ",
              crow.scalar_type());
  TORCH_CHECK(crow.is_contiguous(), op, ": crow_indices must be contiguous");
  TORCH_CHECK(crow.numel() == rows + 1, op, ": crow_indices must have N + 1 = ", rows + 1, " entries, got ",
              crow.numel());
  check_cuda(op, col, "col_indices", 1, ref);
  TORCH_CHECK(col.scalar_type() == at::kShort || col.scalar_type() == at::kInt, op,
              ": col_indices must have dtype torch.int16 or torch.int32, got ", col.scalar_type());
  TORCH_CHECK(col.is_contiguous(), op, ": col_indices must be contiguous");
  TORCH_CHECK(col.scalar_type() == at::kInt || cols <= 32768, op, ": int16 col_indices cannot address K=", cols,
              " columns; use int32");
}

void check_values(const char* op, const at::Tensor& values, const at::Tensor& col, const at::Tensor& ref,
                  const char* ref_name) {
  check_cuda(op, values, "values", 1, ref);
  check_same_dtype(op, values, "values", ref, ref_name);
  TORCH_CHECK(values.is_contiguous(), op, ": values must be contiguous");
  TORCH_CHECK(col.numel() == values.numel(), op, ": col_indices has ", col.numel(), " entries but values has ",
              values.numel());
}

// ------------------------------------------------------------------------------------------ host side
// Rows by decreasing length (stable: equal lengths keep ascending row order), int32.
at::Tensor row_order(const at::Tensor& crow, int64_t rows) {
  const at::Tensor len = crow.narrow(0, 1, rows).sub(crow.narrow(0, 0, rows));
  return std::get<1>(at::sort(len, /*stable=*/true, /*dim=*/0, /*descending=*/true)).to(at::kInt);
}

bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// out [M, rows] = in [M, cols] @ S^T (+ bias) for the CSR matrix S [rows, cols] (crow, col, values), on the
// row-dot kernel (kRowDot, or kAuto with M <= kRowDotMaxM; the caller checks M for kRowDot) or the tiled one.
at::Tensor spmm(const char* op, const at::Tensor& in, const at::Tensor& crow, const at::Tensor& col,
                const at::Tensor& values, const at::Tensor& bias, int64_t rows, CsrKernel kernel = CsrKernel::kAuto) {
  const int64_t M = in.size(0), cols = in.size(1);
  if (M == 0 || rows == 0) return at::zeros({M, rows}, in.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor order = row_order(crow, rows);
  const bool col16 = col.scalar_type() == at::kShort;
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "sparsekit_csr_spmm_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* b = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    if (kernel == CsrKernel::kRowDot || (kernel != CsrKernel::kTiled && M <= kRowDotMaxM)) {
      out = at::empty({M, rows}, in.options());
      const unsigned grid = grid_size(op, (rows + kThreads / 32 - 1) / (kThreads / 32));
      auto launch = [&](auto* col_ptr) {
        using I = std::remove_const_t<std::remove_pointer_t<decltype(col_ptr)>>;
        csr_spmm_rowdot_kernel<scalar_t, A, I><<<grid, kThreads, 0, stream>>>(
            in.const_data_ptr<scalar_t>(), crow.const_data_ptr<int32_t>(), col_ptr,
            values.const_data_ptr<scalar_t>(), order.const_data_ptr<int32_t>(), b, out.mutable_data_ptr<scalar_t>(),
            M, rows, cols);
      };
      if (col16) launch(col.const_data_ptr<int16_t>()); else launch(col.const_data_ptr<int32_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    constexpr int V = VecWidth<scalar_t>::value;
    const int64_t Mp = round_up(M, V);
    const at::Tensor inT = transposed_padded(in, Mp);
    at::Tensor outT = at::empty({rows, Mp}, in.options());
    int sub = 4;
    while (sub < 32 && int64_t(sub) * V < Mp) sub *= 2;
    const int64_t mtiles = (Mp + int64_t(sub) * V - 1) / (int64_t(sub) * V);
    const int slots = kThreads / sub;
    const unsigned grid = grid_size(op, (rows + slots - 1) / slots * mtiles);
    const bool vec_sparse = aligned(values.const_data_ptr(), 4 * sizeof(scalar_t)) &&
                            aligned(col.const_data_ptr(), 4 * col.element_size());
    auto launch = [&](auto* col_ptr) {
      using I = std::remove_const_t<std::remove_pointer_t<decltype(col_ptr)>>;
      csr_spmm_tiled_kernel<scalar_t, A, I><<<grid, kThreads, 0, stream>>>(
          inT.const_data_ptr<scalar_t>(), crow.const_data_ptr<int32_t>(), col_ptr, values.const_data_ptr<scalar_t>(),
          order.const_data_ptr<int32_t>(), b, outT.mutable_data_ptr<scalar_t>(), rows, Mp, sub, mtiles, vec_sparse);
    };
    if (col16) launch(col.const_data_ptr<int16_t>()); else launch(col.const_data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    out = outT.narrow(1, 0, M).t().contiguous();
  });
  return out;
}

at::Tensor row_of_entries(const at::Tensor& crow, int64_t rows, int64_t nnz, cudaStream_t stream) {
  at::Tensor row_of = at::empty({nnz}, crow.options());
  if (nnz > 0) {
    constexpr int kT = 256;
    csr_row_of_kernel<<<grid_size("csr_row_of", (nnz + kT - 1) / kT), kT, 0, stream>>>(
        crow.const_data_ptr<int32_t>(), row_of.mutable_data_ptr<int32_t>(), rows, nnz);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return row_of;
}

// csr_mm on the generic kernels above: what csr_skinny.cu's tensor-core path is checked against.
at::Tensor csr_mm_generic(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                          const at::Tensor& values, const at::Tensor& bias, int64_t n) {
  return spmm("sparsekit::csr_mm", x, crow, col, values, bias, n);
}

// -------------------------------------------------------------------------------------------------- ops
at::Tensor csr_mm_on(const char* op, const at::Tensor& x_in, const at::Tensor& crow, const at::Tensor& col,
                     const at::Tensor& values, const std::optional<at::Tensor>& bias_in, int64_t n, CsrKernel kernel) {
  check_cuda(op, x_in, "x", 2, x_in);
  check_floating(op, x_in, "x");
  TORCH_CHECK(n >= 0, op, ": n must be non-negative, got ", n);
  check_csr_index(op, crow, col, n, x_in.size(1), x_in);
  check_values(op, values, col, x_in, "x");
  const at::Tensor bias = checked_bias(op, bias_in, x_in, "x", n, "n=");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  if (kernel == CsrKernel::kAuto || kernel == CsrKernel::kSkinny) {
    at::Tensor y;  // fp16/bf16, M <= 64: the tensor-core path (csr_skinny.cu) when it applies
    const auto rule = kernel == CsrKernel::kSkinny ? sparsekit_cuda::SkinnyRule::kMeasured
                                                   : sparsekit_cuda::SkinnyRule::kAuto;
    if (sparsekit_cuda::csr_mm_skinny(x, crow, col, values, bias, n, y, &csr_mm_generic,
                                      c10::cuda::getCurrentCUDAStream(), rule)) {
      return y;
    }
    TORCH_CHECK(kernel == CsrKernel::kAuto, op, ": the skinny kernel cannot run this call: it needs float16 or ",
                "bfloat16 x with 1 <= M <= 64 rows, N >= 1, K >= 1, compute capability >= 8.0, SPARSEKIT_CSR_SKINNY ",
                "other than \"0\", and its first-use self-check passed on this device (got ", x.scalar_type(), ", M=",
                x.size(0), ", N=", n, ", K=", x.size(1), ")");
  }
  TORCH_CHECK(kernel != CsrKernel::kRowDot || x.size(0) <= kRowDotMaxM, op, ": the rowdot kernel takes M <= ",
              kRowDotMaxM, " rows, got M=", x.size(0));
  return spmm(op, x, crow, col, values, bias, n, kernel);
}

at::Tensor csr_mm_cuda(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                       const std::optional<at::Tensor>& bias, int64_t n) {
  return csr_mm_on("sparsekit::csr_mm", x, crow, col, values, bias, n, CsrKernel::kAuto);
}

// csr_mm on a named kernel: "auto" (csr_mm's own rule), "skinny" (csr_skinny.cu without its density window),
// "rowdot" (M <= kRowDotMaxM) or "tiled". The dispatcher (sparsekit.ops._dispatch) times them per shape where it
// measures and keeps the fastest: measured, not the thresholds above. A named kernel that cannot run the call
// raises (the measurement then drops it). No autograd formula: the dispatcher calls it only where no gradient
// flows (csr_mm serves the rest).
at::Tensor csr_mm_variant_cuda(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                               const at::Tensor& values, const std::optional<at::Tensor>& bias, int64_t n,
                               c10::string_view variant) {
  constexpr const char* op = "sparsekit::csr_mm_variant";
  CsrKernel kernel;
  if (variant == "auto") {
    kernel = CsrKernel::kAuto;
  } else if (variant == "skinny") {
    kernel = CsrKernel::kSkinny;
  } else if (variant == "rowdot") {
    kernel = CsrKernel::kRowDot;
  } else if (variant == "tiled") {
    kernel = CsrKernel::kTiled;
  } else {
    TORCH_CHECK(false, op, ": variant must be one of \"auto\", \"skinny\", \"rowdot\", \"tiled\", got \"",
                std::string(variant), "\"");
  }
  return csr_mm_on(op, x, crow, col, values, bias, n, kernel);
}

at::Tensor csr_mm_t_cuda(const at::Tensor& dy_in, const at::Tensor& crow, const at::Tensor& col,
                         const at::Tensor& values, int64_t k) {
  constexpr const char* op = "sparsekit::csr_mm_t";
  check_cuda(op, dy_in, "dy", 2, dy_in);
  check_floating(op, dy_in, "dy");
  TORCH_CHECK(k >= 0, op, ": k must be non-negative, got ", k);
  const int64_t M = dy_in.size(0), N = dy_in.size(1), nnz = values.numel();
  check_csr_index(op, crow, col, N, k, dy_in);
  check_values(op, values, col, dy_in, "dy");
  const c10::cuda::CUDAGuard guard(dy_in.device());
  const at::Tensor dy = dy_in.contiguous();
  if (M == 0 || k == 0 || nnz == 0) return at::zeros({M, k}, dy.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // W^T in CSR: entries ordered by column (stable: rows stay ascending inside a column)
  const auto sorted = at::sort(col.to(at::kInt), /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor perm = std::get<1>(sorted);
  const at::Tensor t_crow =
      at::searchsorted(std::get<0>(sorted), at::arange(k + 1, crow.options()), /*out_int32=*/true);
  at::Tensor t_col = row_of_entries(crow, N, nnz, stream).index_select(0, perm);
  if (N <= 32768) t_col = t_col.to(at::kShort);
  const at::Tensor t_val = values.index_select(0, perm);
  return spmm(op, dy, t_crow, t_col.contiguous(), t_val.contiguous(), at::Tensor(), k);
}

at::Tensor csr_sddmm_cuda(const at::Tensor& dy_in, const at::Tensor& x_in, const at::Tensor& crow,
                          const at::Tensor& col_in) {
  constexpr const char* op = "sparsekit::csr_sddmm";
  check_cuda(op, dy_in, "dy", 2, dy_in);
  check_floating(op, dy_in, "dy");
  check_cuda(op, x_in, "x", 2, dy_in);
  check_same_dtype(op, x_in, "x", dy_in, "dy");
  const int64_t M = dy_in.size(0), N = dy_in.size(1), K = x_in.size(1), nnz = col_in.numel();
  TORCH_CHECK(x_in.size(0) == M, op, ": x and dy must have the same number of rows M, got x.size(0)=", x_in.size(0),
              " and dy.size(0)=", M);
  check_csr_index(op, crow, col_in, N, K, dy_in);
  const c10::cuda::CUDAGuard guard(dy_in.device());
  if (nnz == 0 || M == 0) return at::zeros({nnz}, dy_in.options());
  const at::Tensor dy = dy_in.contiguous(), x = x_in.contiguous(), col = col_in.to(at::kInt).contiguous();
  at::Tensor out = at::empty({nnz}, dy.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const CsrEntries entries{crow.const_data_ptr<int32_t>(), col.const_data_ptr<int32_t>(), N};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "sparsekit_csr_sddmm_cuda",
                                  [&] { launch_sddmm<scalar_t>(op, dy, x, entries, out, stream); });
  return out;
}

}  // namespace

// Defined here, not in csrc/ops.cpp: only CUDA builds have the op (the dispatcher checks has_kernel before use).
TORCH_LIBRARY_FRAGMENT(sparsekit, m) {
  m.def("csr_mm_variant(Tensor x, Tensor crow_indices, Tensor col_indices, Tensor values, Tensor? bias, SymInt n, "
        "str variant) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparsekit, CUDA, m) {
  m.impl("csr_mm_variant", &csr_mm_variant_cuda);
  m.impl("csr_mm", &csr_mm_cuda);
  m.impl("csr_mm_t", &csr_mm_t_cuda);
  m.impl("csr_sddmm", &csr_sddmm_cuda);
}
