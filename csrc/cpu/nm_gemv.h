// The AVX-512 / AVX2 n:m product for few rows of x, straight from the NM format (nm_gemv.cpp; CPU-only header).
#pragma once

#include <cstdint>

namespace sparsekit::cpu {

constexpr int64_t kNmGemvMaxRows = 8;

// Whether nm_gemv runs this product here: 1 <= M <= kNmGemvMaxRows, n <= m / 2, and m in {4, 8, 16, 32} with the
// AVX-512 kernels selected or m in {4, 8, 16} with the AVX2 ones (SPARSEKIT_CPU_ISA lowers the choice).
bool nm_gemv_supported(int64_t M, int64_t n, int64_t m);

// out [M, N] fp32 = x [M, K] (fp32) @ W^T (+ bias, fp32 [N] or null) for W's values [N, K/m*n] (fp32, or bf16
// bits when bf16) and positions idx [N, K/m*n] (each < m, checked by the caller).
void nm_gemv(const float* x, int64_t M, int64_t K, const void* v, bool bf16, const uint8_t* idx, int64_t N, int64_t n,
             int64_t m, const float* bias, float* out);

}  // namespace sparsekit::cpu
