// Entry-wise SDDMM kernels shared by the CSR and NM families (csr_spmm.cu, nm_mm.cu), and the vector loads
// they and the SpMM kernels use. Included by .cu files only; everything lives in an anonymous namespace.
//
//   out[e] = sum_m dy[m, row(e)] * x[m, col(e)]   for every stored entry e of W
//
// `Entries` maps a flat entry index to (row, col) of W:
//   CsrEntries: row by binary search in crow_indices (no per-entry row array), col from col_indices (int32)
//   NmEntries:  row = e / kept, col = (e % kept) / n * m + indices[e]
// Two mappings of the work, picked on the host by M:
//   sddmm_thread_kernel (M <= kSddmmThreadMaxM): one thread per entry, reading dy and x row-major as given;
//     consecutive threads read nearby columns of the same row of x (sorted columns), and one dy element.
//   sddmm_warp_kernel: one warp per kSddmmWarpEntries entries, lanes over M with 16-byte vector loads from the
//     transposed, zero-padded copies dyT [N, Mp] and xT [K, Mp]; a shuffle reduction per entry.
// Both accumulate in at::opmath_type<T> (fp32 for fp16/bf16). launch_sddmm (host) picks and launches one of
// them, the same way for both families; transposed_padded also serves csr_spmm.cu's tiled SpMM.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/macros/Macros.h>

#include <cstdint>

#include "checks.cuh"

namespace {

constexpr int kSddmmThreads = 256;
constexpr int kSddmmThreadMaxM = 32;
constexpr int kSddmmWarpEntries = 4;

// Elements of T in one 16-byte vector (fp32 4, fp16/bf16 8, fp64 2).
template <typename T>
struct VecWidth {
  static constexpr int value = 16 / static_cast<int>(sizeof(T));
};

// out[q] = p[q] for q < V, p aligned to 16 bytes when V * sizeof(T) == 16 (one LDG.128).
template <typename T, typename A, int V>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, A (&out)[V]) {
  if constexpr (V * sizeof(T) == 16) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int q = 0; q < V; ++q) out[q] = static_cast<A>(e[q]);
  } else {
#pragma unroll
    for (int q = 0; q < V; ++q) out[q] = static_cast<A>(p[q]);
  }
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Row r with crow[r] <= e < crow[r + 1] (empty rows are skipped: the last r with crow[r] <= e).
__device__ __forceinline__ int64_t csr_row_of(const int32_t* __restrict__ crow, int64_t rows, int64_t e) {
  int64_t lo = 0, hi = rows;  // invariant: crow[lo] <= e < crow[hi]
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) >> 1;
    if (crow[mid] <= e) lo = mid; else hi = mid;
  }
  return lo;
}

struct CsrEntries {
  const int32_t* crow;
  const int32_t* col;
  int64_t rows;
  __device__ __forceinline__ void operator()(int64_t e, int64_t& r, int64_t& c) const {
    r = csr_row_of(crow, rows, e);
    c = col[e];
  }
};

struct NmEntries {
  const uint8_t* indices;
  int64_t kept;
  int n, m;
  __device__ __forceinline__ void operator()(int64_t e, int64_t& r, int64_t& c) const {
    r = e / kept;
    const int64_t j = e - r * kept;
    c = (j / n) * m + indices[e];
  }
};

template <typename T, typename A, typename Entries>
__global__ void __launch_bounds__(kSddmmThreads)
sddmm_thread_kernel(const T* __restrict__ dy, const T* __restrict__ x, Entries entries, T* __restrict__ out,
                    int64_t nnz, int64_t M, int64_t N, int64_t K) {
  const int64_t e = blockIdx.x * int64_t(kSddmmThreads) + threadIdx.x;
  if (e >= nnz) return;
  int64_t r, c;
  entries(e, r, c);
  A acc = A(0);
  for (int64_t m = 0; m < M; ++m) acc += static_cast<A>(dy[m * N + r]) * static_cast<A>(x[m * K + c]);
  out[e] = static_cast<T>(acc);
}

// dyT [N, Mp], xT [K, Mp], Mp a multiple of VecWidth<T> and the pad columns zero.
template <typename T, typename A, typename Entries>
__global__ void __launch_bounds__(kSddmmThreads)
sddmm_warp_kernel(const T* __restrict__ dyT, const T* __restrict__ xT, Entries entries, T* __restrict__ out,
                  int64_t nnz, int64_t Mp) {
  constexpr int V = VecWidth<T>::value;
  const int lane = threadIdx.x & 31;
  const int64_t warp = blockIdx.x * int64_t(kSddmmThreads / 32) + (threadIdx.x >> 5);
  const int64_t e0 = warp * kSddmmWarpEntries;
  if (e0 >= nnz) return;  // whole warps leave together: the shuffles below see full warps
  const T* drow[kSddmmWarpEntries];
  const T* xrow[kSddmmWarpEntries];
  A acc[kSddmmWarpEntries];
#pragma unroll
  for (int q = 0; q < kSddmmWarpEntries; ++q) {
    int64_t r = 0, c = 0;
    if (e0 + q < nnz) entries(e0 + q, r, c);
    drow[q] = dyT + r * Mp;
    xrow[q] = xT + c * Mp;
    acc[q] = A(0);
  }
  for (int64_t m = int64_t(lane) * V; m < Mp; m += 32 * V) {
#pragma unroll
    for (int q = 0; q < kSddmmWarpEntries; ++q) {
      A d[V], xv[V];
      load_vec<T, A, V>(drow[q] + m, d);
      load_vec<T, A, V>(xrow[q] + m, xv);
#pragma unroll
      for (int v = 0; v < V; ++v) acc[q] += d[v] * xv[v];
    }
  }
#pragma unroll
  for (int q = 0; q < kSddmmWarpEntries; ++q) {
    const A s = warp_sum(acc[q]);
    if (lane == 0 && e0 + q < nnz) out[e0 + q] = static_cast<T>(s);
  }
}

// ------------------------------------------------------------------------------------------ host side
inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// src [M, C] -> [C, Mp], Mp >= M, the pad columns zero; always a fresh allocation: the kernels load it 16 bytes
// at a time, and src.t().contiguous() of a one-column src is src itself, which may start at any element offset
inline at::Tensor transposed_padded(const at::Tensor& src, int64_t Mp) {
  if (Mp == src.size(0)) return at::empty({src.size(1), Mp}, src.options()).copy_(src.t());
  at::Tensor t = at::zeros({src.size(1), Mp}, src.options());
  t.narrow(1, 0, src.size(0)).copy_(src.t());
  return t;
}

// out[e] for every entry e < out.numel() of `entries`, from dy [M, N] and x [M, K] (contiguous, of type T,
// M > 0, out not empty), on `stream`: sddmm_thread_kernel for M <= kSddmmThreadMaxM, else sddmm_warp_kernel
// over transposed, zero-padded copies of dy and x. Called from the op's AT_DISPATCH with T = scalar_t.
template <typename T, typename Entries>
void launch_sddmm(const char* op, const at::Tensor& dy, const at::Tensor& x, const Entries& entries, at::Tensor& out,
                  cudaStream_t stream) {
  using A = at::opmath_type<T>;
  const int64_t M = dy.size(0), N = dy.size(1), K = x.size(1), nnz = out.numel();
  if (M <= kSddmmThreadMaxM) {
    sddmm_thread_kernel<T, A, Entries>
        <<<sparsekit_cuda::grid_size(op, (nnz + kSddmmThreads - 1) / kSddmmThreads), kSddmmThreads, 0, stream>>>(
            dy.const_data_ptr<T>(), x.const_data_ptr<T>(), entries, out.mutable_data_ptr<T>(), nnz, M, N, K);
  } else {
    const int64_t Mp = round_up(M, VecWidth<T>::value);
    const at::Tensor dyT = transposed_padded(dy, Mp), xT = transposed_padded(x, Mp);
    const int64_t warps = (nnz + kSddmmWarpEntries - 1) / kSddmmWarpEntries;
    constexpr int kWarpsPerBlock = kSddmmThreads / 32;
    sddmm_warp_kernel<T, A, Entries>
        <<<sparsekit_cuda::grid_size(op, (warps + kWarpsPerBlock - 1) / kWarpsPerBlock), kSddmmThreads, 0, stream>>>(
            dyT.const_data_ptr<T>(), xT.const_data_ptr<T>(), entries, out.mutable_data_ptr<T>(), nnz, Mp);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
