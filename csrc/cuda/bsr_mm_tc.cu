// Tensor-core BSR GEMM for sparsekit::bsr_mm (fp16/bf16, square blocks 16/32/64), reached through
// bsr_mm.cu's bsr_mm_cuda (the op stays one registered CUDA kernel; see bsr_mm_tc.cuh for when it applies).
//
// y = x @ W^T + bias. One thread block (4 warps) per (block-row o, 64 rows of x); for each stored block q of
// block-row o, the 64 x B tile of x at block-column col[q] and the B x B block are staged in shared memory
// with 16-byte loads (rows padded by 8 elements: the fragment loads below are bank-conflict free), then each
// warp runs B/16 x B/8 mma.sync.m16n8k16 (row.col, fp32 accumulators) for its 16 rows. The block W[o, q] is
// stored [n][k], k contiguous, which is exactly the "col" B operand, so no transpose is needed.
// Fragment layout (PTX ISA, m16n8k16 .f16/.bf16): g = lane / 4, t = lane % 4;
//   A regs a0..a3: (row g, k 2t..2t+1), (row g+8, k 2t..), (row g, k 2t+8..), (row g+8, k 2t+8..)
//   B regs b0, b1: (k 2t..2t+1, col g), (k 2t+8..2t+9, col g)
//   C regs c0..c3: (row g, col 2t), (row g, col 2t+1), (row g+8, col 2t), (row g+8, col 2t+1)
#include "mma.cuh"
#include "bsr_mm_tc.cuh"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <climits>
#include <type_traits>

namespace {

constexpr int kThreads = 128;  // 4 warps x 16 rows
constexpr int kTM = 64;
constexpr int kPad = 8;

using sparsekit_cuda::ld32;
using sparsekit_cuda::mma_16816;

template <typename T, int B>
__global__ void __launch_bounds__(kThreads)
bsr_mm_tc_kernel(const T* __restrict__ x, const int32_t* __restrict__ crow, const int32_t* __restrict__ col,
                 const T* __restrict__ values, const T* __restrict__ bias, T* __restrict__ y, int64_t M, int64_t K,
                 int64_t N, int64_t mtiles) {
  constexpr int LD = B + kPad, NT = B / 8, V = 8;  // V: elements per 16-byte load
  __shared__ __align__(16) T xs[kTM * LD];
  __shared__ __align__(16) T ws[B * LD];

  const int64_t o = blockIdx.x / mtiles, m0 = (blockIdx.x % mtiles) * kTM;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  float acc[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;

  const int32_t q_end = crow[o + 1];
  for (int32_t q = crow[o]; q < q_end; ++q) {
    const int64_t kc = int64_t(col[q]) * B;
    for (int idx = tid; idx < kTM * B / V; idx += kThreads) {
      const int r = idx / (B / V), c = (idx % (B / V)) * V;
      const int64_t m = m0 + r;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (m < M) v = *reinterpret_cast<const uint4*>(x + m * K + kc + c);
      *reinterpret_cast<uint4*>(xs + r * LD + c) = v;
    }
    const T* wb = values + int64_t(q) * B * B;
    for (int idx = tid; idx < B * B / V; idx += kThreads) {
      const int r = idx / (B / V), c = (idx % (B / V)) * V;
      *reinterpret_cast<uint4*>(ws + r * LD + c) = *reinterpret_cast<const uint4*>(wb + r * B + c);
    }
    __syncthreads();
#pragma unroll
    for (int k0 = 0; k0 < B; k0 += 16) {
      const T* xa = xs + (warp * 16) * LD + k0 + 2 * t;
      const uint32_t a[4] = {ld32(xa + g * LD), ld32(xa + (g + 8) * LD), ld32(xa + g * LD + 8),
                             ld32(xa + (g + 8) * LD + 8)};
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const T* wp = ws + (nt * 8 + g) * LD + k0 + 2 * t;
        mma_16816<T>(acc[nt], a, ld32(wp), ld32(wp + 8));
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // h = 0: row g, h = 1: row g + 8
      const int64_t m = m0 + warp * 16 + g + 8 * h;
      if (m >= M) continue;
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int64_t c = o * B + nt * 8 + 2 * t + j;
        const float b = bias != nullptr ? static_cast<float>(bias[c]) : 0.f;
        y[m * N + c] = static_cast<T>(acc[nt][2 * h + j] + b);
      }
    }
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T, int B>
void launch(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
            const at::Tensor& bias, at::Tensor& y, int64_t rows, int64_t mtiles, cudaStream_t stream) {
  bsr_mm_tc_kernel<T, B><<<static_cast<unsigned>(rows * mtiles), kThreads, 0, stream>>>(
      x.const_data_ptr<T>(), crow.const_data_ptr<int32_t>(), col.const_data_ptr<int32_t>(), values.const_data_ptr<T>(),
      bias.defined() ? bias.const_data_ptr<T>() : nullptr, y.mutable_data_ptr<T>(), x.size(0), x.size(1), y.size(1),
      mtiles);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

namespace sparsekit_cuda {

bool bsr_mm_tensor_core(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                        const at::Tensor& values, const at::Tensor& bias, at::Tensor& y, int64_t rows,
                        cudaStream_t stream) {
  const auto dtype = x.scalar_type();
  if (dtype != at::kHalf && dtype != at::kBFloat16) return false;
  const int64_t B = values.size(1);
  if (values.size(2) != B || (B != 16 && B != 32 && B != 64)) return false;
  if (!aligned16(x.const_data_ptr()) || !aligned16(values.const_data_ptr())) return false;
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, x.get_device()));
  if (major < 8) return false;
  const int64_t mtiles = (x.size(0) + kTM - 1) / kTM;
  if (rows * mtiles > INT_MAX) return false;
  if (rows == 0 || x.size(0) == 0) return true;  // nothing to compute; y is [M, N] with M or N zero
  if (dtype == at::kHalf) {
    if (B == 16) launch<c10::Half, 16>(x, crow, col, values, bias, y, rows, mtiles, stream);
    else if (B == 32) launch<c10::Half, 32>(x, crow, col, values, bias, y, rows, mtiles, stream);
    else launch<c10::Half, 64>(x, crow, col, values, bias, y, rows, mtiles, stream);
  } else {
    if (B == 16) launch<c10::BFloat16, 16>(x, crow, col, values, bias, y, rows, mtiles, stream);
    else if (B == 32) launch<c10::BFloat16, 32>(x, crow, col, values, bias, y, rows, mtiles, stream);
    else launch<c10::BFloat16, 64>(x, crow, col, values, bias, y, rows, mtiles, stream);
  }
  return true;
}

}  // namespace sparsekit_cuda
