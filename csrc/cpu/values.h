// Which dtypes take the SIMD fast path, and the stored values converted as each path reads them: shared by the
// BSR, CSR and n:m ops (bsr_gemm.cpp, csr_spmm.cpp, nm_gemm.cpp). CPU-only header.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include <utility>

#include "simd.h"

namespace sparsekit::cpu {

// Whether activations of dtype t run the SIMD micro-kernels (simd.h); float64 runs the plain loops.
inline bool use_fast(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

// The values as the fast path reads them: fp32 as is, bf16 as raw bits, fp16 converted to fp32 (a copy).
inline std::pair<at::Tensor, WKind> fast_values(const at::Tensor& values) {
  if (values.scalar_type() == at::kBFloat16) return {values, WKind::kBF16};
  return {values.to(at::kFloat).contiguous(), WKind::kF32};
}

// Values (and transposed activations for sddmm) in the accumulation type: a no-op for float32/float64.
inline at::Tensor to_acc(const at::Tensor& t) { return t.to(at::toOpMathType(t.scalar_type())); }

}  // namespace sparsekit::cpu
