// Run-time ISA selection and the SIMD micro-kernels' entry points (CPU-only header).
//
// The micro-kernels (spmm_kernels.inc) are compiled three times in spmm_isa.cpp: for AVX-512 (F/BW/VL/DQ),
// for AVX2+FMA (each under `#pragma GCC target`, no global -march) and portably (GCC vector extension,
// SSE2 on x86-64 / NEON on arm64). active_isa() picks the best one this CPU supports at run time;
// SPARSEKIT_CPU_ISA=avx512|avx2|scalar lowers the choice (never raises it), for tests and comparisons.
//
// All kernels vectorize over M: activations are packed as fp32 panels xp[tile][k][MT] (MT = nv vectors),
// and each stored weight is broadcast against MT rows of x. Outputs come back as fp32 panels out[row][MT].
#pragma once

#include <cstdint>

namespace sparsekit::cpu {

enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };
enum class WKind : int { kF32 = 0, kBF16 = 1 };  // how stored weight values are held (bf16: raw uint16 bits)

Isa active_isa();           // best supported, lowered by SPARSEKIT_CPU_ISA
// SPARSEKIT_CPU_ISA as asked for (read per call, case-insensitive): "" when unset, else "amx", "avx512", "avx2"
// or "scalar"; any other value warns once and counts as unset (a typo must not drop to the portable kernels)
const char* requested_isa();
const char* isa_name(Isa);  // "avx512", "avx2", "scalar"
int vec_floats(Isa);        // fp32 lanes per vector: 16, 8, 4
int acc_regs(Isa);          // accumulator registers the register tiles may use: 24, 12, 12

// BSR, one block-row: out[i][0:MT] = sum_{b in [b0,b1)} sum_kk W_b[i][kk] * xp[col[b]*bk + kk][0:MT]
// for i < bn; v points at the values of block 0 ([nnzb, bn, bk] row-major). MT = nv * vec_floats(isa); row k of
// xp starts at xp + k * ldx (MT for a packed panel; M to read a [K, M] x^T in place), or at xp + rowoff[k] when
// rowoff is given (a convolution reading its padded image in place).
void bsr_panel_row(Isa isa, int nv, const float* xp, int64_t ldx, const int64_t* rowoff, const int32_t* col,
                   int64_t b0, int64_t b1, const void* v, WKind wk, int64_t bn, int64_t bk, float* out);

// BSR with 1-row blocks (bn == 1), block-rows [r0, r1): out[r - r0][0:MT] as bsr_panel_row gives it for a packed
// panel (rows MT apart; out 64-byte aligned), computed K-blocked: block-columns in chunks of kcb (cols = K / bk in
// all), every block-row taking its blocks of a chunk while the chunk's kcb * bk panel rows stay in L1. cur is
// scratch of r1 - r0 entries. ypf (may be null): ypf_rows rows of ypf_bytes bytes, ypf_ld bytes apart, prefetched
// for writing during the last chunk (the part of y the caller stores next).
void bsr_kblock_rows(Isa isa, int nv, const float* xp, const int32_t* crow, const int32_t* col, int64_t r0,
                     int64_t r1, const void* v, WKind wk, int64_t bk, int64_t cols, int64_t kcb, int64_t* cur,
                     float* out, const char* ypf, int64_t ypf_ld, int64_t ypf_bytes, int64_t ypf_rows);

// BSR, one block-row times a single row of x (GEMV): out[i] = sum_b W_b[i, :] . x[col[b]*bk : +bk].
void bsr_gemv_row(Isa isa, const float* x, const int32_t* col, int64_t b0, int64_t b1, const void* v, WKind wk,
                  int64_t bn, int64_t bk, float* out);

// BSR, one block-row, vectorized over N (needs bn % vec_floats(isa) == 0): for m < mrows,
// y[m * ldy + i] = bias[i] + sum_b sum_kk wt_b[kk][i] * x[m * ldx + col[b]*bk + kk], i < bn, where wt holds
// every block transposed ([nnzb, bk, bn], fp32). bias (the block-row's bn entries) may be null.
void bsr_nvec_row(Isa isa, const float* x, int64_t ldx, int64_t mrows, const int32_t* col, int64_t b0, int64_t b1,
                  const float* wt, int64_t bn, int64_t bk, const float* bias, float* y, int64_t ldy);

// dst[j * ldd + i] = src[i * lds + j] (+ bias[i] when bias is not null) for i < rows, j < cols.
void transpose(Isa isa, const float* src, int64_t lds, int64_t rows, int64_t cols, const float* bias, float* dst,
               int64_t ldd);

// CSR rows [r0, r1): out[r - r0][0:MT] = sum_e v[e] * xp[idx[e]][0:MT], row k of xp at xp + k * MT (rowoff null)
// or at xp + rowoff[k] (a convolution reading its padded image in place).
void csr_panel_rows(Isa isa, int nv, const float* xp, const int64_t* rowoff, const int32_t* ptr, const int16_t* idx,
                    const void* v, WKind wk, int64_t r0, int64_t r1, float* out);
void csr_panel_rows(Isa isa, int nv, const float* xp, const int64_t* rowoff, const int32_t* ptr, const int32_t* idx,
                    const void* v, WKind wk, int64_t r0, int64_t r1, float* out);

// CSR SDDMM rows [r0, r1): out[e] = sum_m dyT[r * M + m] * xT[idx[e] * M + m] for e in [ptr[r], ptr[r + 1]).
void csr_sddmm_rows(Isa isa, const float* dyT, const float* xT, int64_t M, const int32_t* ptr, const int16_t* idx,
                    int64_t r0, int64_t r1, float* out);
void csr_sddmm_rows(Isa isa, const float* dyT, const float* xT, int64_t M, const int32_t* ptr, const int32_t* idx,
                    int64_t r0, int64_t r1, float* out);

}  // namespace sparsekit::cpu
