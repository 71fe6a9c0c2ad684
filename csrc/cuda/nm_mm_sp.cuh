// Sparse-tensor-core path of sparsekit::nm_mm for 2:4 (defined in nm_mm_sp.cu, called from nm_mm.cu's nm_mm_cuda
// behind the SPARSEKIT_NM_SP first-use self-check of selfcheck.cuh).
#pragma once

#include <ATen/core/Tensor.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace sparsekit_cuda {

// y [M, N] = x [M, K] @ W^T (+ bias) with W [N, K] in the NM format (values [N, K/2], uint8 positions [N, K/2],
// positions strictly increasing inside each group of 4) on the sparse tensor cores (mma.sp m16n8k32, fp32
// accumulation) when it applies: n:m == 2:4, fp16/bf16, compute capability >= 8.0, at most INT_MAX thread
// blocks. Any K (a multiple of 4) and any M, N: tails are zero-padded in shared memory, stores predicated;
// 16-byte loads where K and the pointers allow them, element loads otherwise. Returns false, touching nothing,
// when it does not apply; the caller then runs its generic kernel. x, values, indices, y contiguous; bias
// undefined or contiguous [N]. This is the raw launcher: it does not consult the self-check.
bool nm_mm_sparse_tensor_core(const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices,
                              const at::Tensor& bias, at::Tensor& y, int64_t n, int64_t m, cudaStream_t stream);

}  // namespace sparsekit_cuda
