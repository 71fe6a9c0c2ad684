// bfloat16 BSR on Intel AMX tiles: the VNNI packing of the blocks, the tile kernel and the bf16 store (amx.h).
// Only the functions inside the `#pragma GCC target` region use AMX / AVX-512; they run only after
// amx_enabled() said yes (the x^T packers, AVX-512 only, also after bf16_dot_enabled(): bf16_dot.h), so the
// library still loads and runs on any x86-64 (and builds on arm64: stubs).
#include "amx.h"
#include "simd.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

// AMX intrinsics need GCC 11 / clang 12 or newer; older compilers build the stubs (AMX never enabled).
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__linux__) && \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#define SPARSEKIT_AMX 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#else
#define SPARSEKIT_AMX 0
#endif

namespace sparsekit::cpu {

#if SPARSEKIT_AMX
namespace {

// CPUID.(7,0):EDX bit 22 = AMX-BF16, bit 24 = AMX-TILE; AVX-512F/BW (EBX bits 16, 30) for the packing;
// CPUID.(7,1):EAX bit 5 = AVX512-BF16 for the output conversion. Linux hands out the 8 KiB tile state only on
// request (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA, feature 18); the grant covers every thread of the process.
bool detect() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool amx = ((d >> 22) & 1) && ((d >> 24) & 1) && ((b >> 16) & 1) && ((b >> 30) & 1);
  if (!__get_cpuid_count(7, 1, &a, &b, &c, &d)) return false;
  const bool cpu = amx && ((a >> 5) & 1);
  constexpr long kReqXcompPerm = 0x1023, kXfeatureXtileData = 18;
  return cpu && syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtileData) == 0;
}

// The 64-byte operand of LDTILECFG (palette 1): per tile its rows and bytes per row.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-3: fp32 accumulators C[m 16][n 16] (tile 2 * m-half + n-half); 4-5: A = rows of x [m 16][KC bf16];
// 6-7: B = packed weight words [KC/2 pairs][n 16].
TileConfig config_for(int kc) {
  TileConfig cfg;
  for (int t = 0; t < 4; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;
  for (int t = 4; t < 6; ++t) cfg.rows[t] = 16, cfg.colsb[t] = static_cast<uint16_t>(kc * 2);
  for (int t = 6; t < 8; ++t) cfg.rows[t] = static_cast<uint8_t>(kc / 2), cfg.colsb[t] = 64;
  return cfg;
}

}  // namespace

#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16")
namespace {

// 16x16 transpose of 32-bit words: r[i] holds row i on entry and column i on return (integer shuffles only,
// so bf16 pairs pass bit-exact: no float arithmetic that could flush denormal-looking words).
inline void transpose16(__m512i* r) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // lane L of r[4i + c]: rows 4i..4i+3 of column 4L + c
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int c = 0; c < 4; ++c) {  // 4x4 transpose of 128-bit lanes across r[c], r[4+c], r[8+c], r[12+c]
    const __m512i a = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x88), b = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xDD);
    const __m512i e = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x88),
                  f = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xDD);
    t[c] = _mm512_shuffle_i32x4(a, e, 0x88);
    t[4 + c] = _mm512_shuffle_i32x4(b, f, 0x88);
    t[8 + c] = _mm512_shuffle_i32x4(a, e, 0xDD);
    t[12 + c] = _mm512_shuffle_i32x4(b, f, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// wv[b] = the words of block b ([bn][bk/2] bf16 pairs) transposed to [bk/2][bn], for blocks [b0, b1).
void pack_w_avx512(const uint16_t* v, int64_t b0, int64_t b1, int64_t bn, int64_t bk, uint32_t* wv) {
  const int64_t words = bk / 2;
  for (int64_t b = b0; b < b1; ++b) {
    const uint32_t* src = reinterpret_cast<const uint32_t*>(v + b * bn * bk);
    uint32_t* dst = wv + (b - b0) * bn * words;
    for (int64_t i0 = 0; i0 < bn; i0 += 16) {
      for (int64_t w0 = 0; w0 < words; w0 += 16) {
        const int64_t nw = words - w0 < 16 ? words - w0 : 16;
        const __mmask16 mask = static_cast<__mmask16>((1u << nw) - 1);
        __m512i r[16];
        for (int i = 0; i < 16; ++i) r[i] = _mm512_maskz_loadu_epi32(mask, src + (i0 + i) * words + w0);
        transpose16(r);
        for (int64_t w = 0; w < nw; ++w) _mm512_storeu_si512(dst + (w0 + w) * bn + i0, r[w]);
      }
    }
  }
}

// One NS-column slab (NS = 16 or 32) of every block-row in [r0, r1) for kAmxMT rows of x, k-steps of KC (16
// or 32) bf16: C[m 16][n 16] tiles, A = rows of x read in place, B = packed weight words.
template <int NS, int KC>
void rows_kernel(const uint16_t* x, int64_t ldx, const int32_t* crow, const int32_t* col, int64_t r0, int64_t r1,
                 const uint32_t* wv, int64_t b_base, int64_t bn, int64_t bk, float* out, int64_t ldo) {
  const int64_t lda = ldx * 2, ldb = bn * 4, ldc = ldo * 4, half = 16 * ldx;
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t s = 0; s < bn; s += NS) {
      _tile_zero(0);
      _tile_zero(2);
      if constexpr (NS == 32) {
        _tile_zero(1);
        _tile_zero(3);
      }
      for (int64_t b = crow[r]; b < crow[r + 1]; ++b) {
        const uint16_t* xa = x + col[b] * bk;
        const uint32_t* wb = wv + (b - b_base) * bn * (bk / 2) + s;
        for (int64_t kc = 0; kc < bk; kc += KC) {
          const uint32_t* wk = wb + (kc / 2) * bn;
          _tile_loadd(4, xa + kc, lda);
          _tile_loadd(5, xa + half + kc, lda);
          _tile_loadd(6, wk, ldb);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(2, 5, 6);
          if constexpr (NS == 32) {
            _tile_loadd(7, wk + 16, ldb);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(3, 5, 7);
          }
        }
      }
      float* o = out + (r - r0) * bn + s;
      _tile_stored(0, o, ldc);
      _tile_stored(2, o + 16 * ldo, ldc);
      if constexpr (NS == 32) {
        _tile_stored(1, o + 16, ldc);
        _tile_stored(3, o + 16 * ldo + 16, ldc);
      }
    }
  }
}

void bsr_rows_amx(const uint16_t* x, int64_t ldx, const int32_t* crow, const int32_t* col, int64_t r0, int64_t r1,
                  const uint32_t* wv, int64_t b_base, int64_t bn, int64_t bk, float* out, int64_t ldo) {
  const bool wide = bn % 32 == 0, k32 = bk % 32 == 0;
  if (wide && k32) rows_kernel<32, 32>(x, ldx, crow, col, r0, r1, wv, b_base, bn, bk, out, ldo);
  else if (wide) rows_kernel<32, 16>(x, ldx, crow, col, r0, r1, wv, b_base, bn, bk, out, ldo);
  else if (k32) rows_kernel<16, 32>(x, ldx, crow, col, r0, r1, wv, b_base, bn, bk, out, ldo);
  else rows_kernel<16, 16>(x, ldx, crow, col, r0, r1, wv, b_base, bn, bk, out, ldo);
}

// ---- x^T layout (convolutions): C[n 16][m 16] tiles, A = the stored blocks read in place, B = x^T row pairs

// _mm512_permutex2var_epi16 indices interleaving two rows a, b of 32 bf16 into the pairs (a[j], b[j]) for
// j = first .. first + 15 (first = 0: words 0..15, first = 16: words 16..31).
inline __m512i pair_index(int first) {
  alignas(64) uint16_t idx[32];
  for (int i = 0; i < 32; ++i) idx[i] = static_cast<uint16_t>((i % 2 ? 32 : 0) + first + i / 2);
  return _mm512_load_si512(idx);
}

// xv[r * ldv + j] = bf16 pair (xt[2r][m0 + j], xt[2r + 1][m0 + j]) for r in [r0, r1), j < ldv (zero past M).
void pack_xt_avx512(const uint16_t* xt, int64_t M, int64_t m0, int64_t r0, int64_t r1, int64_t ldv, uint32_t* xv) {
  const __m512i lo_idx = pair_index(0), hi_idx = pair_index(16);
  for (int64_t r = r0; r < r1; ++r) {
    const uint16_t* e = xt + 2 * r * M;
    const uint16_t* o = e + M;
    uint32_t* dst = xv + r * ldv;
    for (int64_t j = 0; j < ldv; j += 32) {
      const int64_t n = M - m0 - j;
      const __mmask32 mask = n >= 32 ? ~__mmask32(0) : n <= 0 ? 0 : static_cast<__mmask32>((uint64_t(1) << n) - 1);
      const __m512i a = _mm512_maskz_loadu_epi16(mask, e + m0 + j), b = _mm512_maskz_loadu_epi16(mask, o + m0 + j);
      _mm512_storeu_si512(dst + j, _mm512_permutex2var_epi16(a, lo_idx, b));
      _mm512_storeu_si512(dst + j + 16, _mm512_permutex2var_epi16(a, hi_idx, b));
    }
  }
}

// amx_pack_xt of a stride-1 convolution's implicit im2col matrix: K-row k = ((c * kd + kz) * kh + ky) * kw + kx
// holds, at pixel m = (od * Ho + ho) * Wo + wo, x[c][od + kz * dd - pd][ho + ky * dh - ph][wo + kx * dw - pw] (zero
// outside the image; 2-D: one depth).
void pack_conv_avx512(const uint16_t* x, const AmxConv& g, int64_t r0, int64_t r1, int64_t ldv, uint32_t* xv) {
  const __m512i lo_idx = pair_index(0), hi_idx = pair_index(16);
  struct Tap {
    const uint16_t* volume;
    int64_t dz, dy, dx;
  };
  auto tap = [&](int64_t k) {
    const int64_t kx = k % g.kw, ky = (k / g.kw) % g.kh, kz = (k / (g.kw * g.kh)) % g.kd;
    const int64_t c = k / (g.kw * g.kh * g.kd);
    return Tap{x + c * g.D * g.H * g.W, kz * g.dd - g.pd, ky * g.dh - g.ph, kx * g.dw - g.pw};
  };
  // lanes of output columns [wo0, wo0 + n) that fall inside the image for a tap's column shift dx
  auto cols_mask = [&](int64_t dx, int64_t wo0, int64_t n) {
    const int64_t first = std::max<int64_t>(0, -(wo0 + dx)), last = std::min<int64_t>(n, g.W - (wo0 + dx));
    if (first >= last) return __mmask32(0);
    return static_cast<__mmask32>(((uint64_t(1) << last) - 1) & ~((uint64_t(1) << first) - 1));
  };
  for (int64_t r = r0; r < r1; ++r) {
    const Tap a = tap(2 * r), b = tap(2 * r + 1);
    for (int64_t od = 0; od < g.Do; ++od) {
      const int64_t za = od + a.dz, zb = od + b.dz;  // the input depth each tap reads (outside: zeros)
      const bool dep_a = za >= 0 && za < g.D, dep_b = zb >= 0 && zb < g.D;
      uint32_t* dst = xv + r * ldv + od * g.Ho * g.Wo;
      for (int64_t wo0 = 0; wo0 < g.Wo; wo0 += 32) {  // masks depend on the column chunk only: hoisted out of ho
        const int64_t n = std::min<int64_t>(32, g.Wo - wo0);
        const __mmask32 ma = dep_a ? cols_mask(a.dx, wo0, n) : 0, mb = dep_b ? cols_mask(b.dx, wo0, n) : 0;
        const __mmask16 m_lo = static_cast<__mmask16>(n >= 16 ? 0xFFFF : (1u << n) - 1);
        const __mmask16 m_hi = static_cast<__mmask16>(n >= 32 ? 0xFFFF : n <= 16 ? 0 : (1u << (n - 16)) - 1);
        // row ho of a tap at p + ho * W (formed only for a depth inside the image)
        const uint16_t* pa = dep_a ? a.volume + (za * g.H + a.dy) * g.W + wo0 + a.dx : x;
        const uint16_t* pb = dep_b ? b.volume + (zb * g.H + b.dy) * g.W + wo0 + b.dx : x;
        for (int64_t ho = 0; ho < g.Ho; ++ho) {
          const bool in_a = ho + a.dy >= 0 && ho + a.dy < g.H, in_b = ho + b.dy >= 0 && ho + b.dy < g.H;
          const __m512i va = _mm512_maskz_loadu_epi16(in_a ? ma : 0, pa + ho * g.W);
          const __m512i vb = _mm512_maskz_loadu_epi16(in_b ? mb : 0, pb + ho * g.W);
          uint32_t* d = dst + ho * g.Wo + wo0;
          _mm512_mask_storeu_epi32(d, m_lo, _mm512_permutex2var_epi16(va, lo_idx, vb));
          if (m_hi) _mm512_mask_storeu_epi32(d + 16, m_hi, _mm512_permutex2var_epi16(va, hi_idx, vb));
        }
      }
    }
  }
}

// One NS-row slab (NS = 16 or 32) of every block-row in [r0, r1) for 32 columns of x^T (two B tiles).
template <int NS, int KC>
void rows_kernel_t(const uint32_t* xv, int64_t ldv, const int32_t* crow, const int32_t* col, int64_t r0, int64_t r1,
                   const uint16_t* v, int64_t bn, int64_t bk, float* out) {
  constexpr int64_t ldo = 32 * 4;
  const int64_t lda = bk * 2, ldb = ldv * 4;
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t s = 0; s < bn; s += NS) {
      _tile_zero(0);
      _tile_zero(1);
      if constexpr (NS == 32) {
        _tile_zero(2);
        _tile_zero(3);
      }
      for (int64_t b = crow[r]; b < crow[r + 1]; ++b) {
        const uint16_t* a = v + b * bn * bk + s * bk;
        const uint32_t* xb = xv + col[b] * (bk / 2) * ldv;
        for (int64_t kc = 0; kc < bk; kc += KC) {
          const uint32_t* xk = xb + (kc / 2) * ldv;
          _tile_loadd(4, a + kc, lda);
          _tile_loadd(6, xk, ldb);
          _tile_loadd(7, xk + 16, ldb);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          if constexpr (NS == 32) {
            _tile_loadd(5, a + 16 * bk + kc, lda);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
          }
        }
      }
      float* o = out + ((r - r0) * bn + s) * 32;
      _tile_stored(0, o, ldo);
      _tile_stored(1, o + 16, ldo);
      if constexpr (NS == 32) {
        _tile_stored(2, o + 16 * 32, ldo);
        _tile_stored(3, o + 16 * 32 + 16, ldo);
      }
    }
  }
}

void bsr_rows_amx_t(const uint32_t* xv, int64_t ldv, const int32_t* crow, const int32_t* col, int64_t r0, int64_t r1,
                    const uint16_t* v, int64_t bn, int64_t bk, float* out) {
  const bool wide = bn % 32 == 0, k32 = bk % 32 == 0;
  if (wide && k32) rows_kernel_t<32, 32>(xv, ldv, crow, col, r0, r1, v, bn, bk, out);
  else if (wide) rows_kernel_t<32, 16>(xv, ldv, crow, col, r0, r1, v, bn, bk, out);
  else if (k32) rows_kernel_t<16, 32>(xv, ldv, crow, col, r0, r1, v, bn, bk, out);
  else rows_kernel_t<16, 16>(xv, ldv, crow, col, r0, r1, v, bn, bk, out);
}

void store_bf16_t_avx512(const float* out, int64_t rows, int64_t mc, const float* bias, uint16_t* y, int64_t ldy) {
  const __mmask16 m_lo = static_cast<__mmask16>(mc >= 16 ? 0xFFFF : (1u << mc) - 1);
  const __mmask16 m_hi = static_cast<__mmask16>(mc >= 32 ? 0xFFFF : mc <= 16 ? 0 : (1u << (mc - 16)) - 1);
  for (int64_t i = 0; i < rows; ++i) {
    const __m512 b = _mm512_set1_ps(bias ? bias[i] : 0.f);
    const __m512 f0 = _mm512_add_ps(_mm512_loadu_ps(out + i * 32), b);
    const __m512 f1 = _mm512_add_ps(_mm512_loadu_ps(out + i * 32 + 16), b);
    _mm256_mask_storeu_epi16(y + i * ldy, m_lo, (__m256i)_mm512_cvtneps_pbh(f0));
    if (m_hi) _mm256_mask_storeu_epi16(y + i * ldy + 16, m_hi, (__m256i)_mm512_cvtneps_pbh(f1));
  }
}

// ---- SDDMM: dW_b = dy^T[rows of b] @ x[:, columns of b], M (padded to 32) the contraction

// One block: out[i * bk + j] = sum_m dyt[i * ldd + m] * x[m][j], x given as amx_pack_xt row pairs of its
// columns (xv at the block's first column, ldv words apart). NS rows (16 or 32) by NJ columns (16 or 32) per step.
template <int NS, int NJ>
void sddmm_block_kernel(const uint16_t* dyt, int64_t ldd, const uint32_t* xv, int64_t ldv, int64_t Mp, int64_t bn,
                        int64_t bk, float* out) {
  const int64_t lda = ldd * 2, ldb = ldv * 4, ldc = bk * 4;
  for (int64_t s = 0; s < bn; s += NS) {
    for (int64_t j = 0; j < bk; j += NJ) {
      _tile_zero(0);
      if constexpr (NJ == 32) _tile_zero(1);
      if constexpr (NS == 32) _tile_zero(2);
      if constexpr (NS == 32 && NJ == 32) _tile_zero(3);
      for (int64_t m0 = 0; m0 < Mp; m0 += 32) {
        const uint16_t* a = dyt + s * ldd + m0;
        const uint32_t* b = xv + (m0 / 2) * ldv + j;
        _tile_loadd(4, a, lda);
        _tile_loadd(6, b, ldb);
        _tile_dpbf16ps(0, 4, 6);
        if constexpr (NJ == 32) {
          _tile_loadd(7, b + 16, ldb);
          _tile_dpbf16ps(1, 4, 7);
        }
        if constexpr (NS == 32) {
          _tile_loadd(5, a + 16 * ldd, lda);
          _tile_dpbf16ps(2, 5, 6);
          if constexpr (NJ == 32) _tile_dpbf16ps(3, 5, 7);
        }
      }
      float* o = out + s * bk + j;
      _tile_stored(0, o, ldc);
      if constexpr (NJ == 32) _tile_stored(1, o + 16, ldc);
      if constexpr (NS == 32) _tile_stored(2, o + 16 * bk, ldc);
      if constexpr (NS == 32 && NJ == 32) _tile_stored(3, o + 16 * bk + 16, ldc);
    }
  }
}

void sddmm_block_amx(const uint16_t* dyt, int64_t ldd, const uint32_t* xv, int64_t ldv, int64_t Mp, int64_t bn,
                     int64_t bk, float* out) {
  const bool wide = bn % 32 == 0, j32 = bk % 32 == 0;
  if (wide && j32) sddmm_block_kernel<32, 32>(dyt, ldd, xv, ldv, Mp, bn, bk, out);
  else if (wide) sddmm_block_kernel<32, 16>(dyt, ldd, xv, ldv, Mp, bn, bk, out);
  else if (j32) sddmm_block_kernel<16, 32>(dyt, ldd, xv, ldv, Mp, bn, bk, out);
  else sddmm_block_kernel<16, 16>(dyt, ldd, xv, ldv, Mp, bn, bk, out);
}

void load_config(int64_t bk) {
  const TileConfig cfg = config_for(bk % 32 == 0 ? 32 : 16);
  // not _tile_loadconfig: GCC 12's version tells the compiler it reads 8 bytes, so the stores filling the rest
  // of a local config can be dropped as dead (palette 0 then leaves the tiles unconfigured: SIGILL)
  __asm__ volatile("ldtilecfg %0" : : "m"(cfg));
}

void release_tiles() { _tile_release(); }

void store_bf16_avx512(const float* out, int64_t ldo, int64_t cols, int64_t mc, const float* bias, uint16_t* y,
                       int64_t ldy) {
  for (int64_t j = 0; j < mc; ++j) {
    for (int64_t i = 0; i < cols; i += 16) {
      __m512 f = _mm512_loadu_ps(out + j * ldo + i);
      if (bias) f = _mm512_add_ps(f, _mm512_loadu_ps(bias + i));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + j * ldy + i), (__m256i)_mm512_cvtneps_pbh(f));
    }
  }
}

}  // namespace
#pragma GCC pop_options

bool amx_enabled() {
  static const bool ready = detect();
  if (!ready) return false;
  const std::string want = requested_isa();  // read per call, as active_isa() does
  return want.empty() || want == "amx";
}

void amx_pack_w(const uint16_t* v, int64_t b0, int64_t b1, int64_t bn, int64_t bk, uint32_t* wv) {
  pack_w_avx512(v, b0, b1, bn, bk, wv);
}

AmxTileScope::AmxTileScope(int64_t bk) { load_config(bk); }
AmxTileScope::~AmxTileScope() { release_tiles(); }

void amx_bsr_rows(const uint16_t* x, int64_t ldx, const int32_t* crow, const int32_t* col, int64_t r0, int64_t r1,
                  const uint32_t* wv, int64_t b_base, int64_t bn, int64_t bk, float* out, int64_t ldo) {
  bsr_rows_amx(x, ldx, crow, col, r0, r1, wv, b_base, bn, bk, out, ldo);
}

void amx_store_bf16(const float* out, int64_t ldo, int64_t cols, int64_t mc, const float* bias, uint16_t* y,
                    int64_t ldy) {
  store_bf16_avx512(out, ldo, cols, mc, bias, y, ldy);
}

void amx_pack_xt(const uint16_t* xt, int64_t M, int64_t m0, int64_t r0, int64_t r1, int64_t ldv, uint32_t* xv) {
  pack_xt_avx512(xt, M, m0, r0, r1, ldv, xv);
}

void amx_pack_conv(const uint16_t* x, const AmxConv& g, int64_t r0, int64_t r1, int64_t ldv, uint32_t* xv) {
  pack_conv_avx512(x, g, r0, r1, ldv, xv);
}

void amx_bsr_rows_t(const uint32_t* xv, int64_t ldv, const int32_t* crow, const int32_t* col, int64_t r0, int64_t r1,
                    const uint16_t* v, int64_t bn, int64_t bk, float* out) {
  bsr_rows_amx_t(xv, ldv, crow, col, r0, r1, v, bn, bk, out);
}

void amx_store_bf16_t(const float* out, int64_t rows, int64_t mc, const float* bias, uint16_t* y, int64_t ldy) {
  store_bf16_t_avx512(out, rows, mc, bias, y, ldy);
}

void amx_sddmm_block(const uint16_t* dyt, int64_t ldd, const uint32_t* xv, int64_t ldv, int64_t Mp, int64_t bn,
                     int64_t bk, float* out) {
  sddmm_block_amx(dyt, ldd, xv, ldv, Mp, bn, bk, out);
}

#else  // not x86-64 Linux: never enabled, so the entry points below are unreachable

bool amx_enabled() { return false; }
void amx_pack_w(const uint16_t*, int64_t, int64_t, int64_t, int64_t, uint32_t*) { std::abort(); }
AmxTileScope::AmxTileScope(int64_t) { std::abort(); }
AmxTileScope::~AmxTileScope() = default;
void amx_bsr_rows(const uint16_t*, int64_t, const int32_t*, const int32_t*, int64_t, int64_t, const uint32_t*, int64_t,
                  int64_t, int64_t, float*, int64_t) {
  std::abort();
}
void amx_store_bf16(const float*, int64_t, int64_t, int64_t, const float*, uint16_t*, int64_t) { std::abort(); }
void amx_pack_xt(const uint16_t*, int64_t, int64_t, int64_t, int64_t, int64_t, uint32_t*) { std::abort(); }
void amx_pack_conv(const uint16_t*, const AmxConv&, int64_t, int64_t, int64_t, uint32_t*) { std::abort(); }
void amx_bsr_rows_t(const uint32_t*, int64_t, const int32_t*, const int32_t*, int64_t, int64_t, const uint16_t*,
                    int64_t, int64_t, float*) {
  std::abort();
}
void amx_store_bf16_t(const float*, int64_t, int64_t, const float*, uint16_t*, int64_t) { std::abort(); }
void amx_sddmm_block(const uint16_t*, int64_t, const uint32_t*, int64_t, int64_t, int64_t, int64_t, float*) {
  std::abort();
}

#endif

}  // namespace sparsekit::cpu
