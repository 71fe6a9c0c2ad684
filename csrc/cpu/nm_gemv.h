// The AVX-512 / AVX2 n:m product for few rows of x, straight from the NM format (nm_gemv.cpp; CPU-only header).
#pragma once

#include <cstdint>

#include "simd.h"

namespace sparsekit::cpu {

constexpr int64_t kNmGemvMaxRows = 8;

// Whether nm_gemv runs this product on isa (the caller's active_isa(), read once and passed to both calls):
// 1 <= M <= kNmGemvMaxRows, n <= m / 2, and m in {4, 8, 16, 32} on AVX-512 or {4, 8, 16} on AVX2.
bool nm_gemv_supported(Isa isa, int64_t M, int64_t n, int64_t m);

// out [M, N] fp32 = x [M, K] (fp32) @ W^T (+ bias, fp32 [N] or null) for W's values [N, K/m*n] (fp32, or bf16
// bits when bf16) and positions idx [N, K/m*n] (each < m, checked by the caller); nm_gemv_supported(isa, ...) holds.
void nm_gemv(Isa isa, const float* x, int64_t M, int64_t K, const void* v, bool bf16, const uint8_t* idx, int64_t N,
             int64_t n, int64_t m, const float* bias, float* out);

}  // namespace sparsekit::cpu
