// CUDA kernels for the NM ops (schemas and semantics in csrc/ops.cpp): n:m semi-structured W [N, K] stored as
// values [N, K/m*n] and uint8 indices (position 0..m-1 of each kept value inside its group of m), any
// 1 <= n <= m <= 256, float32/float64/float16/bfloat16, 16-bit types accumulate in fp32 (at::opmath_type).
//
//   nm_mm     y  = x @ W^T + bias   "load sparse, compute dense" on CUDA cores: one thread block per
//   nm_mm_t   dx = dy @ W           (kTM rows of the input) x (kTO output columns); per kRC-wide chunk of the
//                                   reduction axis the input tile is staged in shared memory and the matching
//                                   tile of W is expanded from its compressed form into a dense shared tile
//                                   (zero fill, then each stored value scattered to its column), then a dense
//                                   register-tiled product. The chunk need not align with the groups of m: the
//                                   groups overlapping the chunk are scanned and entries outside it dropped.
//                                   No atomics; x / dy are read exactly as given (row-major, coalesced).
//                                   (nm_mm with 2:4 fp16/bf16: sparse tensor cores, mma.sp in nm_mm_sp.cu,
//                                   after a first-use self-check against this kernel, selfcheck.cuh)
//   nm_sddmm  dW = (dy^T @ x) on W's pattern: the entry-wise kernels of sddmm.cuh.
//
// 2:4 fp16/bf16 nm_mm runs on the sparse tensor cores (nm_mm_sp.cu: mma.sp.m16n8k32 with our uint8 positions
// re-encoded into the hardware's 2-bit metadata while tiles are staged) once its probe agreed with the generic
// kernel on the device; SPARSEKIT_NM_SP=0 keeps it off, =force skips the probe. nm_mm_t and nm_sddmm, and
// every other n:m or dtype, run the generic kernels here. (Those need no sm_80 feature, but the extension only
// holds code for the TORCH_CUDA_ARCH_LIST it was built with: setup.py's default "8.0+PTX;9.0a" covers 8.x, 9.0
// and, through the PTX, newer GPUs, not 7.x; the dispatcher's cuda backend says so rather than failing with
// "no kernel image is available".)
//
// Index data is trusted here (checking it would need a device sync); sparsekit.formats validates it (NM.validate:
// positions strictly increasing in each group). The generic kernels sum a position given twice, as the reference
// does; the mma.sp path needs valid positions (its 2-bit metadata cannot say "twice").
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.cuh"

#include <algorithm>
#include <climits>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "nm_mm_sp.cuh"
#include "sddmm.cuh"
#include "selfcheck.cuh"

namespace {

constexpr int kThreads = 256;
constexpr int kTM = 32;                          // rows of the input per thread block
constexpr int kTO = 64;                          // output columns per thread block
constexpr int kRC = 32;                          // reduction chunk
constexpr int kRowsPerThread = kTM * kTO / kThreads;  // 8: each thread owns one output column, 8 rows
static_assert(kThreads % kTO == 0 && kRowsPerThread * (kThreads / kTO) == kTM, "tile shape");

// ------------------------------------------------------------------------------------------ kernels
// out[i, o] = sum_j in[i, j] * B(j, o) (+ bias[o]):
//   nm_mm   (kTrans = false): in = x [M, K],  j over K, o over N, B(j, o) = W[o, j]
//   nm_mm_t (kTrans = true):  in = dy [M, N], j over N, o over K, B(j, o) = W[j, o]
template <typename T, typename A, bool kTrans>
__global__ void __launch_bounds__(kThreads)
nm_gemm_kernel(const T* __restrict__ in, const T* __restrict__ values, const uint8_t* __restrict__ indices,
               const T* __restrict__ bias, T* __restrict__ out, int64_t M, int64_t N, int64_t K, int64_t kept, int n,
               int m, int64_t otiles) {
  __shared__ A a_s[kTM][kRC];
  __shared__ A b_s[kRC][kTO + 1];  // +1: the scatter of one W row (kTrans = false) walks down a column

  const int64_t groups = kept / n;
  const int64_t red = kTrans ? N : K, out_cols = kTrans ? K : N;
  const int64_t o0 = (blockIdx.x % otiles) * kTO, m0 = (blockIdx.x / otiles) * kTM;
  const int tid = threadIdx.x, oi = tid % kTO, mg = tid / kTO;

  A acc[kRowsPerThread];
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) acc[i] = A(0);

  for (int64_t j0 = 0; j0 < red; j0 += kRC) {
    for (int idx = tid; idx < kRC * (kTO + 1); idx += kThreads) (&b_s[0][0])[idx] = A(0);
    for (int idx = tid; idx < kTM * kRC; idx += kThreads) {
      const int mi = idx / kRC, j = idx % kRC;
      const int64_t mm = m0 + mi, jj = j0 + j;
      a_s[mi][j] = (mm < M && jj < red) ? static_cast<A>(in[mm * red + jj]) : A(0);
    }
    __syncthreads();
    // expand: the W rows of this tile and the K range [k_lo, k_lo + k_len) of it
    const int64_t w_row0 = kTrans ? j0 : o0, k_lo = kTrans ? o0 : j0;
    const int w_rows = kTrans ? kRC : kTO, k_len = kTrans ? kTO : kRC;
    const int64_t g_lo = k_lo / m, g_hi = std::min<int64_t>(groups - 1, (k_lo + k_len - 1) / m);
    const int64_t ng = g_hi - g_lo + 1;  // groups per W row overlapping the chunk
    // one thread per (W row, group): its n entries are added in turn, so a position given twice sums, as the
    // reference and the CPU kernels do (groups own disjoint columns: no two threads write one slot)
    for (int64_t idx = tid; idx < w_rows * ng; idx += kThreads) {
      const int ri = static_cast<int>(idx / ng);
      const int64_t grp = g_lo + idx % ng, row = w_row0 + ri;
      if (row >= N) continue;
      for (int e = 0; e < n; ++e) {
        const int64_t pos = row * kept + grp * n + e;
        const int64_t kk = grp * m + indices[pos] - k_lo;
        if (kk >= 0 && kk < k_len) {
          const A v = static_cast<A>(values[pos]);
          if (kTrans) b_s[ri][kk] += v; else b_s[kk][ri] += v;
        }
      }
    }
    __syncthreads();
#pragma unroll 8
    for (int j = 0; j < kRC; ++j) {
      const A b = b_s[j][oi];
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) acc[i] += a_s[mg * kRowsPerThread + i][j] * b;
    }
    __syncthreads();
  }

  const int64_t o = o0 + oi;
  if (o < out_cols) {
    const A bv = bias != nullptr ? static_cast<A>(bias[o]) : A(0);
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const int64_t mm = m0 + mg * kRowsPerThread + i;
      if (mm < M) out[mm * out_cols + o] = static_cast<T>(acc[i] + bv);
    }
  }
}

// ------------------------------------------------------------------------------------------- checks
using sparsekit_cuda::check_cuda;
using sparsekit_cuda::check_floating;
using sparsekit_cuda::check_same_dtype;
using sparsekit_cuda::checked_bias;
using sparsekit_cuda::grid_size;

// Checks n, m and indices; returns K = indices.size(1) / n * m.
int64_t check_pattern(const char* op, const at::Tensor& indices, int64_t n, int64_t m, const at::Tensor& ref) {
  TORCH_CHECK(n >= 1 && n <= m && m <= 256, op, ": n and m must satisfy 1 <= n <= m <= 256 (uint8 positions), got n=",
              n, ", m=", m);
  check_cuda(op, indices, "indices", 2, ref);
  TORCH_CHECK(indices.scalar_type() == at::kByte, op, ": indices must have dtype torch.uint8, got ",
              indices.scalar_type());
  TORCH_CHECK(indices.is_contiguous(), op, ": indices must be contiguous");
  const int64_t kept = indices.size(1);
  TORCH_CHECK(kept % n == 0, op, ": indices.size(1) (", kept, ") must be a multiple of n=", n);
  return kept / n * m;
}

void check_values(const char* op, const at::Tensor& values, const at::Tensor& indices, const at::Tensor& ref,
                  const char* ref_name) {
  check_cuda(op, values, "values", 2, ref);
  check_same_dtype(op, values, "values", ref, ref_name);
  TORCH_CHECK(values.is_contiguous(), op, ": values must be contiguous");
  TORCH_CHECK(values.sizes() == indices.sizes(), op, ": values and indices must have the same shape, got ",
              values.sizes(), " and ", indices.sizes());
}

template <bool kTrans>
void launch_gemm(const char* op, const at::Tensor& in, const at::Tensor& values, const at::Tensor& indices,
                 const at::Tensor& bias, at::Tensor& out, int64_t N, int64_t K, int64_t n, int64_t m) {
  const int64_t M = in.size(0), out_cols = out.size(1);
  const int64_t otiles = (out_cols + kTO - 1) / kTO, mtiles = (M + kTM - 1) / kTM;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "sparsekit_nm_gemm_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    nm_gemm_kernel<scalar_t, A, kTrans><<<grid_size(op, otiles * mtiles), kThreads, 0, stream>>>(
        in.const_data_ptr<scalar_t>(), values.const_data_ptr<scalar_t>(), indices.const_data_ptr<uint8_t>(),
        bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr, out.mutable_data_ptr<scalar_t>(), M, N, K,
        indices.size(1), static_cast<int>(n), static_cast<int>(m), otiles);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// First-use self-check of the 2:4 sparse-tensor-core path (selfcheck.cuh): for fp16 and bf16, problems that
// reach every tile shape of nm_mm_sp.cu (M <= 8, <= 16, <= 32, > 32 and two M tiles), N and K tails (K not a
// multiple of the stage, of 32, of 16 and of 8: the element-load paths), an all-zero row, bias and no bias,
// all six 2:4 patterns; entries are small multiples of 1/8 and 1/4 (exact in both dtypes, every partial sum
// exact in fp32), so the two kernels should agree to the bit. Both run on `stream` and are compared there.
std::string nm_sp_probe(const at::Device& device, cudaStream_t stream) {
  struct Case { int64_t M, N, K; bool bias; };
  const Case cases[] = {{1, 40, 520, true},   {7, 96, 512, false},  {13, 70, 132, true},
                        {30, 64, 256, false}, {45, 130, 224, true}, {70, 33, 100, false}};
  const uint8_t pairs[6][2] = {{0, 1}, {0, 2}, {0, 3}, {1, 2}, {1, 3}, {2, 3}};
  for (const auto dtype : {at::kHalf, at::kBFloat16}) {
    for (const Case& c : cases) {
      const int64_t kept = c.K / 2;
      std::vector<float> x_h(c.M * c.K), v_h(c.N * kept), b_h(c.N);
      std::vector<uint8_t> i_h(c.N * kept);
      for (int64_t i = 0; i < c.M; ++i) {
        for (int64_t k = 0; k < c.K; ++k) x_h[i * c.K + k] = static_cast<float>((i * 3 + k * 5) % 11 - 5) * 0.125f;
      }
      for (int64_t r = 0; r < c.N; ++r) {
        b_h[r] = static_cast<float>(r % 5 - 2) * 0.5f;
        for (int64_t e = 0; e < kept; ++e) {
          const int64_t grp = e / 2;
          i_h[r * kept + e] = pairs[(r * 5 + grp * 3 + r * grp) % 6][e % 2];
          v_h[r * kept + e] = r % 17 == 3 ? 0.f : static_cast<float>((r * 7 + e * 3) % 9 - 4) * 0.25f;
        }
      }
      const auto f32 = at::TensorOptions().dtype(at::kFloat);
      const at::Tensor x = at::from_blob(x_h.data(), {c.M, c.K}, f32).to(device, dtype);
      const at::Tensor values = at::from_blob(v_h.data(), {c.N, kept}, f32).to(device, dtype);
      const at::Tensor indices = at::from_blob(i_h.data(), {c.N, kept}, at::TensorOptions().dtype(at::kByte)).to(device);
      const at::Tensor bias = c.bias ? at::from_blob(b_h.data(), {c.N}, f32).to(device, dtype) : at::Tensor();
      at::Tensor y_sp = at::empty({c.M, c.N}, x.options());
      at::Tensor y_ref = at::empty({c.M, c.N}, x.options());
      if (!sparsekit_cuda::nm_mm_sparse_tensor_core(x, values, indices, bias, y_sp, 2, 4, stream)) continue;
      launch_gemm<false>("sparsekit::nm_mm", x, values, indices, bias, y_ref, c.N, c.K, 2, 4);
      const std::string mismatch = sparsekit_cuda::probe_mismatch(  // exact sums: any rounding is a bug
          y_sp, y_ref, 1e-3f,
          std::string(sparsekit_cuda::probe_dtype_name(dtype)) + " M=" + std::to_string(c.M) + " N=" +
              std::to_string(c.N) + " K=" + std::to_string(c.K));
      if (!mismatch.empty()) return mismatch;
    }
  }
  return "";
}

struct NmSparseTensorCoreTag {};

// -------------------------------------------------------------------------------------------------- ops
at::Tensor nm_mm_cuda(const at::Tensor& x_in, const at::Tensor& values, const at::Tensor& indices,
                      const std::optional<at::Tensor>& bias_in, int64_t n, int64_t m) {
  constexpr const char* op = "sparsekit::nm_mm";
  check_cuda(op, x_in, "x", 2, x_in);
  check_floating(op, x_in, "x");
  const int64_t K = check_pattern(op, indices, n, m, x_in);
  check_values(op, values, indices, x_in, "x");
  const int64_t M = x_in.size(0), N = values.size(0);
  TORCH_CHECK(x_in.size(1) == K, op, ": x.size(1) must be K = values.size(1) / n * m = ", K, ", got ", x_in.size(1));
  const at::Tensor bias = checked_bias(op, bias_in, x_in, "x", N, "N = values.size(0) = ");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  if (K == 0) return bias.defined() ? bias.unsqueeze(0).expand({M, N}).contiguous() : at::zeros({M, N}, x.options());
  // 2:4 fp16/bf16: sparse tensor cores (nm_mm_sp.cu), once its self-check passed on this device
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool sp_candidate = n == 2 && m == 4 && (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16);
  if (sp_candidate &&
      sparsekit_cuda::path_enabled<NmSparseTensorCoreTag>("SPARSEKIT_NM_SP", x.get_device(),
                                                          [&] { return nm_sp_probe(x.device(), stream); }) &&
      sparsekit_cuda::nm_mm_sparse_tensor_core(x, values, indices, bias, y, n, m, stream)) {
    return y;
  }
  launch_gemm<false>(op, x, values, indices, bias, y, N, K, n, m);
  return y;
}

at::Tensor nm_mm_t_cuda(const at::Tensor& dy_in, const at::Tensor& values, const at::Tensor& indices, int64_t n,
                        int64_t m) {
  constexpr const char* op = "sparsekit::nm_mm_t";
  check_cuda(op, dy_in, "dy", 2, dy_in);
  check_floating(op, dy_in, "dy");
  const int64_t K = check_pattern(op, indices, n, m, dy_in);
  check_values(op, values, indices, dy_in, "dy");
  const int64_t M = dy_in.size(0), N = dy_in.size(1);
  TORCH_CHECK(values.size(0) == N, op, ": dy.size(1) must be N = values.size(0) = ", values.size(0), ", got ", N);
  const c10::cuda::CUDAGuard guard(dy_in.device());
  const at::Tensor dy = dy_in.contiguous();
  if (M == 0 || K == 0 || N == 0) return at::zeros({M, K}, dy.options());
  at::Tensor dx = at::empty({M, K}, dy.options());
  launch_gemm<true>(op, dy, values, indices, at::Tensor(), dx, N, K, n, m);
  return dx;
}

at::Tensor nm_sddmm_cuda(const at::Tensor& dy_in, const at::Tensor& x_in, const at::Tensor& indices, int64_t n,
                         int64_t m) {
  constexpr const char* op = "sparsekit::nm_sddmm";
  check_cuda(op, dy_in, "dy", 2, dy_in);
  check_floating(op, dy_in, "dy");
  check_cuda(op, x_in, "x", 2, dy_in);
  check_same_dtype(op, x_in, "x", dy_in, "dy");
  const int64_t K = check_pattern(op, indices, n, m, dy_in);
  const int64_t M = dy_in.size(0), N = dy_in.size(1), kept = indices.size(1), nnz = N * kept;
  TORCH_CHECK(x_in.size(0) == M, op, ": x and dy must have the same number of rows M, got x.size(0)=", x_in.size(0),
              " and dy.size(0)=", M);
  TORCH_CHECK(indices.size(0) == N, op, ": dy.size(1) must be N = indices.size(0) = ", indices.size(0), ", got ", N);
  TORCH_CHECK(x_in.size(1) == K, op, ": x.size(1) must be K = indices.size(1) / n * m = ", K, ", got ", x_in.size(1));
  const c10::cuda::CUDAGuard guard(dy_in.device());
  if (nnz == 0 || M == 0) return at::zeros({N, kept}, dy_in.options());
  const at::Tensor dy = dy_in.contiguous(), x = x_in.contiguous();
  at::Tensor out = at::empty({N, kept}, dy.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const NmEntries entries{indices.const_data_ptr<uint8_t>(), kept, static_cast<int>(n), static_cast<int>(m)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "sparsekit_nm_sddmm_cuda",
                                  [&] { launch_sddmm<scalar_t>(op, dy, x, entries, out, stream); });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekit, CUDA, m) {
  m.impl("nm_mm", &nm_mm_cuda);
  m.impl("nm_mm_t", &nm_mm_t_cuda);
  m.impl("nm_sddmm", &nm_sddmm_cuda);
}
