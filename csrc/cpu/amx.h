// bfloat16 BSR on Intel AMX tiles (Sapphire Rapids and later; CPU-only header).
//
// y = x @ W^T with rows of x as the A operand, read in place ([16 rows][32 bf16] of x is an AMX A tile), and
// the stored blocks as the B operand in VNNI order: each block's [bn][bk] bf16 values, seen as [bn][bk/2]
// 32-bit pairs, transposed to wv_b[bk/2][bn] (amx_pack_w, per call and per L2-sized chunk of block-rows, so the
// packed copy never goes to memory: the weights are read once, as by a dense GEMV).
// Accumulation is fp32 in the tiles; results come back as fp32 rows out[m][cols], kAmxMT rows of x at a time,
// and amx_store_bf16 adds the bias and rounds them into y. Convolutions use the transposed layout (bottom).
#pragma once

#include <cstdint>

namespace sparsekit::cpu {

constexpr int64_t kAmxMT = 32;  // rows of x per kernel call: two 16-row A tiles

// The CPU has AMX-TILE, AMX-BF16 and AVX512-BF16, the kernel granted this process the tile state, and
// SPARSEKIT_CPU_ISA is unset or "amx" (a lower ISA named there turns AMX off, as it lowers the SIMD kernels).
// The environment is read per call.
bool amx_enabled();

// Blocks the AMX kernel takes: bn and bk multiples of 16.
inline bool amx_block_ok(int64_t bn, int64_t bk) { return bn > 0 && bk > 0 && bn % 16 == 0 && bk % 16 == 0; }

// wv[(b - b0) * bn * bk/2 + w * bn + i] = bf16 pair (v_b[i][2w], v_b[i][2w + 1]) for blocks b in [b0, b1); v is
// the values array ([nnzb, bn, bk] bf16 bits).
void amx_pack_w(const uint16_t* v, int64_t b0, int64_t b1, int64_t bn, int64_t bk, uint32_t* wv);

// Tile configuration for one bk, loaded on construction and released on destruction: amx_bsr_rows runs only
// inside a scope of its bk, on the thread that opened it (tile state is per thread).
class AmxTileScope {
 public:
  explicit AmxTileScope(int64_t bk);
  ~AmxTileScope();
  AmxTileScope(const AmxTileScope&) = delete;
  AmxTileScope& operator=(const AmxTileScope&) = delete;
};

// For block-rows r in [r0, r1) and m < kAmxMT: out[m * ldo + (r - r0) * bn + i] = sum over the row's blocks b
// and kk < bk of x[m * ldx + col[b] * bk + kk] * v_b[i][kk], with wv from amx_pack_w holding the blocks from
// b_base on (b_base <= crow[r0]). x must have kAmxMT readable rows (the caller pads a tail); amx_block_ok(bn, bk)
// must hold; inside an AmxTileScope of this bk.
void amx_bsr_rows(const uint16_t* x, int64_t ldx, const int32_t* crow, const int32_t* col, int64_t r0, int64_t r1,
                  const uint32_t* wv, int64_t b_base, int64_t bn, int64_t bk, float* out, int64_t ldo);

// y[j * ldy + i] = bf16(out[j * ldo + i] + bias[i]) for j < mc, i < cols (a multiple of 16), rounded to nearest
// even (AVX512-BF16 VCVTNEPS2BF16, which also flushes fp32 denormals to zero). bias may be null.
void amx_store_bf16(const float* out, int64_t ldo, int64_t cols, int64_t mc, const float* bias, uint16_t* y,
                    int64_t ldy);

// ---- The transposed layout of convolutions: y^T [N, M] = W @ x^T [K, M] per image. Here the stored blocks are
// the A operand, read in place, and x^T the B operand: pairs of its rows interleaved into VNNI words; results
// come back as fp32 panels out[row][32] (32 columns of y^T), in y^T's own orientation.

// xv[r * ldv + j] = bf16 pair (xt[2r][m0 + j], xt[2r + 1][m0 + j]) for r in [r0, r1), j < ldv (a multiple of 32;
// zero where m0 + j >= M); xt is one image's [K, M] bf16 bits. AVX-512 BW only: the AVX512-BF16 pair panels
// (bf16_dot.h) read these words too, on CPUs without AMX.
void amx_pack_xt(const uint16_t* xt, int64_t M, int64_t m0, int64_t r0, int64_t r1, int64_t ldv, uint32_t* xv);

// A stride-1 convolution's geometry: one image x [C, D, H, W], kernel kd x kh x kw, padding, dilation, output
// Do x Ho x Wo (2-D: D = kd = Do = 1, pd = 0, dd = 1).
struct AmxConv {
  int64_t C, D, H, W, kd, kh, kw, pd, ph, pw, dd, dh, dw, Do, Ho, Wo;
};

// amx_pack_xt of the convolution's im2col matrix [C * kd * kh * kw, Do * Ho * Wo] (never materialized), for row
// pairs [r0, r1) of one image; columns past Do * Ho * Wo are left as they are (their results are never stored).
void amx_pack_conv(const uint16_t* x, const AmxConv& g, int64_t r0, int64_t r1, int64_t ldv, uint32_t* xv);

// For block-rows r in [r0, r1) and j < 32: out[((r - r0) * bn + i) * 32 + j] = sum over the row's blocks b and
// kk < bk of v_b[i][kk] * x^T[col[b] * bk + kk][j], x^T given as amx_pack_xt words (row pairs ldv apart, the 32
// columns at xv); amx_block_ok(bn, bk) must hold; inside an AmxTileScope of this bk.
void amx_bsr_rows_t(const uint32_t* xv, int64_t ldv, const int32_t* crow, const int32_t* col, int64_t r0, int64_t r1,
                    const uint16_t* v, int64_t bn, int64_t bk, float* out);

// y[i * ldy + j] = bf16(out[i * 32 + j] + bias[i]) for i < rows, j < mc <= 32 (bias may be null).
void amx_store_bf16_t(const float* out, int64_t rows, int64_t mc, const float* bias, uint16_t* y, int64_t ldy);

// ---- SDDMM (dW on the blocks): out[i * bk + j] = sum_m dyt[i * ldd + m] * x[m][j] for i < bn, j < bk, one block:
// dyt its [bn, Mp] slab of dy^T (bf16, zero past M), x its columns as amx_pack_xt row pairs of the zero-padded
// [Mp, K] x (xv at the block's first column, ldv words apart); Mp a multiple of 32; inside an AmxTileScope(32).
void amx_sddmm_block(const uint16_t* dyt, int64_t ldd, const uint32_t* xv, int64_t ldv, int64_t Mp, int64_t bn,
                     int64_t bk, float* out);

}  // namespace sparsekit::cpu
