// BSR micro-kernels for bfloat16 on AVX512-BF16 dot products (vdpbf16ps), for CPUs that have them but no AMX
// (AMD Zen 4 / Zen 5, Intel Cooper Lake). CPU-only header; the kernels live in bf16_dot.cpp.
//
// vdpbf16ps adds two bf16 products into each fp32 lane: acc[m] += x[m][2p] * w[2p] + x[m][2p + 1] * w[2p + 1].
// Activations are packed as "pair panels" of 32-bit words, xp[p][m] = (x[m][2p], x[m][2p + 1]) for the MT rows
// of x of a tile (the low half holds the even k), and a weight row's pair (w[i][2p], w[i][2p + 1]) is one 32-bit
// broadcast straight from the [bn][bk] row-major block: twice the multiply-adds per instruction of the fp32 FMA
// kernels, which widen both operands first, and half the panel bytes. Products of bf16 values are exact in
// fp32; the instruction treats denormal inputs and results as zero.
#pragma once

#include <cstdint>

namespace sparsekit::cpu {

// Whether the pair-panel kernels may run: the CPU has AVX512-BF16 but AMX is not in use (amx_enabled(): where it
// is, the AMX kernels and, for what they do not take, the widening ones run), and SPARSEKIT_CPU_ISA is unset or
// "amx" ("avx512" asks for the plain AVX-512 kernels, "avx2" / "scalar" for lower ones). Built for x86-64 Linux with
// GCC >= 11 / clang >= 12, as the AMX kernels are (the convolutions share their x^T packers, amx.h).
bool bf16_dot_enabled();

// The CPU has AVX512-BF16 (whatever SPARSEKIT_CPU_ISA says).
bool cpu_has_bf16_dot();

// Pair panel of one tile: dst[p * MT + j] = (x[j][2p], x[j][2p + 1]) for p < K / 2, j < mc; zero for
// mc <= j < MT. x is the tile's first row (bf16 bits, rows ldx elements apart); K even.
void pack_pair_panel(const uint16_t* x, int64_t ldx, int64_t mc, int64_t K, int64_t MT, uint32_t* dst);

// BSR, one block-row against a pair panel (MT = nv * 16 rows of x, row p of the panel at xp + p * ldx words; ldx
// = MT for pack_pair_panel's panels, the packed width for amx_pack_xt / amx_pack_conv's row pairs of an x^T):
// out[i][0:MT] = sum_{b in [b0, b1)} sum_kk W_b[i][kk] * x[:, col[b] * bk + kk] for i < bn, fp32. v: the bf16
// values of block 0 ([nnzb, bn, bk] row-major). bk even; nv in {1, 2, 4}.
void bsr_pair_panel_row(int nv, const uint32_t* xp, int64_t ldx, const int32_t* col, int64_t b0, int64_t b1,
                        const uint16_t* v, int64_t bn, int64_t bk, float* out);

}  // namespace sparsekit::cpu
