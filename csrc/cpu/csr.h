// The CPU CSR products as plain functions, for other CPU kernels that reuse them (nm_gemm.cpp runs the n:m
// products through them). Same arguments, checks and results as the ops sparsekit::csr_mm / csr_mm_t /
// csr_sddmm.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace sparsekit::cpu {

at::Tensor csr_mm_cpu(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                      const std::optional<at::Tensor>& bias, int64_t n);
at::Tensor csr_mm_t_cpu(const at::Tensor& dy, const at::Tensor& crow, const at::Tensor& col,
                        const at::Tensor& values, int64_t k);
at::Tensor csr_sddmm_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col);

}  // namespace sparsekit::cpu
