// Skinny "load sparse, compute dense" tensor-core path of sparsekit::csr_mm (defined in csr_skinny.cu, called
// from csr_spmm.cu's csr_mm_cuda: the op stays one registered CUDA kernel). See csr_skinny.cu for the design.
#pragma once

#include <ATen/core/Tensor.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace sparsekit_cuda {

// The generic CSR product y [M, n] = x @ W^T (+ bias) the path is checked against (csr_spmm.cu's Sputnik-style
// kernels); x contiguous, M > 0, n > 0; bias undefined or contiguous [n].
using CsrMmGeneric = at::Tensor (*)(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                                    const at::Tensor& values, const at::Tensor& bias, int64_t n);

// y = x @ W^T (+ bias) for the CSR matrix W [n, K] (crow int32 [n + 1], col int16/int32 sorted within each row,
// values [nnz]) on the tensor cores, when the path applies; then y is set to a new [M, n] tensor and true is
// returned. Otherwise returns false, touching nothing, and the caller runs its generic kernel.
//
// Applies (SPARSEKIT_CSR_SKINNY unset or "1"): fp16/bf16, 1 <= M <= 64, n >= 1, K >= 1, compute capability
// >= 8.0, density nnz / (n * K) in [0.09, 0.5] (sparsity 50% to ~91%), and the first-use self-check on this
// device passed (selfcheck.cuh; the probe compares the raw launcher with `generic`, once per device and
// process; it is not run while the stream is being captured into a CUDA graph: such calls take the generic
// kernel until an eager call has probed the device).
// "force": the same hard requirements (dtype, M, compute capability, sizes) but no density window and no probe.
// "0": never. x contiguous; bias undefined or contiguous [n].
//
// rule = kMeasured (sparsekit::csr_mm_variant "skinny": the dispatcher measured this path against the generic
// kernels for the shape and it won) drops the density window; the switch and the self-check still apply.
enum class SkinnyRule { kAuto, kMeasured };
bool csr_mm_skinny(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                   const at::Tensor& bias, int64_t n, at::Tensor& y, CsrMmGeneric generic, cudaStream_t stream,
                   SkinnyRule rule = SkinnyRule::kAuto);

}  // namespace sparsekit_cuda
