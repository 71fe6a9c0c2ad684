// Tensor-core path of sparsekit::bsr_mm (defined in bsr_mm_tc.cu, called from bsr_mm.cu's bsr_mm_cuda).
#pragma once

#include <ATen/core/Tensor.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace sparsekit_cuda {

// y [M, N] = x [M, K] @ W^T (+ bias) on the tensor cores (mma.sync m16n8k16, fp32 accumulation) when it
// applies: fp16/bf16, square blocks of 16, 32 or 64, 16-byte aligned x and values, compute capability >= 8.0.
// Returns false, touching nothing, when it does not apply; the caller then runs its generic kernel.
// x, y contiguous; bias undefined or contiguous [N]; rows = N / block.
bool bsr_mm_tensor_core(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                        const at::Tensor& values, const at::Tensor& bias, at::Tensor& y, int64_t rows,
                        cudaStream_t stream);

}  // namespace sparsekit_cuda
