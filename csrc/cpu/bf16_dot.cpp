// AVX512-BF16 pair-panel kernels for BSR x dense in bfloat16 (see bf16_dot.h). Only the functions inside the
// `#pragma GCC target` region use AVX-512; bf16_dot_enabled() guards every call, so the library still loads and
// runs on any x86-64 (and builds elsewhere, where the kernels are stubs that are never called).
#include "bf16_dot.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>
#include <string>

#include "amx.h"
#include "simd.h"

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__linux__) && \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#include <immintrin.h>
#define SPARSEKIT_BF16_DOT 1
#else
#define SPARSEKIT_BF16_DOT 0
#endif

namespace sparsekit::cpu {

bool cpu_has_bf16_dot() {
#if SPARSEKIT_BF16_DOT
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512f") &&
           __builtin_cpu_supports("avx512bw");
  }();
  return ok;
#else
  return false;
#endif
}

bool bf16_dot_enabled() {
  if (!cpu_has_bf16_dot() || active_isa() != Isa::kAvx512 || amx_enabled()) return false;
  const std::string want = requested_isa();
  return want.empty() || want == "amx";
}

void pack_pair_panel(const uint16_t* x, int64_t ldx, int64_t mc, int64_t K, int64_t MT, uint32_t* dst) {
  const int64_t P = K / 2;
  // 64 pairs at a time: the MT x 64 words being written (16 KiB at MT = 64) stay in L1 until whole
  for (int64_t p0 = 0; p0 < P; p0 += 64) {
    const int64_t p1 = std::min(P, p0 + 64);
    for (int64_t j = 0; j < mc; ++j) {
      const uint16_t* row = x + j * ldx;
      for (int64_t p = p0; p < p1; ++p) {
        uint32_t w;
        std::memcpy(&w, row + 2 * p, sizeof(w));   // (x[j][2p], x[j][2p + 1]), the even k in the low half
        dst[p * MT + j] = w;
      }
    }
    for (int64_t p = p0; p < p1; ++p) std::fill(dst + p * MT + mc, dst + (p + 1) * MT, 0u);
  }
}

#if SPARSEKIT_BF16_DOT
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma")
namespace {

// Register tile of R weight rows x NV vectors (16 rows of x each): per pair of k, NV panel loads, R 32-bit
// broadcasts of the weight pairs, R * NV dot products.
template <int R, int NV>
void pair_tile(const uint32_t* xp, int64_t ldx, const int32_t* col, int64_t b0, int64_t b1, const uint16_t* v,
               int64_t bn, int64_t bk, int64_t i0, float* out) {
  constexpr int64_t MT = NV * 16;
  const int64_t pairs = bk / 2;
  __m512 acc[R][NV];
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t b = b0; b < b1; ++b) {
    const uint16_t* w = v + (b * bn + i0) * bk;
    const uint32_t* xc = xp + int64_t(col[b]) * pairs * ldx;
    for (int64_t p = 0; p < pairs; ++p) {
      __m512bh xv[NV];
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) xv[j] = (__m512bh)_mm512_loadu_si512(xc + p * ldx + j * 16);
#pragma GCC unroll 16
      for (int i = 0; i < R; ++i) {
        uint32_t pair;
        std::memcpy(&pair, w + i * bk + 2 * p, sizeof(pair));
        const __m512bh wb = (__m512bh)_mm512_set1_epi32(int(pair));
#pragma GCC unroll 4
        for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], wb, xv[j]);
      }
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) _mm512_storeu_ps(out + (i0 + i) * MT + j * 16, acc[i][j]);
}

template <int NV, int R>
inline void pair_tile_r(int r, const uint32_t* xp, int64_t ldx, const int32_t* col, int64_t b0, int64_t b1,
                        const uint16_t* v, int64_t bn, int64_t bk, int64_t i0, float* out) {
  if constexpr (R >= 1) {
    if (r == R) {
      pair_tile<R, NV>(xp, ldx, col, b0, b1, v, bn, bk, i0, out);
    } else {
      pair_tile_r<NV, R - 1>(r, xp, ldx, col, b0, b1, v, bn, bk, i0, out);
    }
  }
}

template <int NV>
void pair_row(const uint32_t* xp, int64_t ldx, const int32_t* col, int64_t b0, int64_t b1, const uint16_t* v,
              int64_t bn, int64_t bk, float* out) {
  constexpr int kRmax = 24 / NV < 12 ? 24 / NV : 12;   // 24 accumulators; the rest hold x and the broadcast
  const int64_t groups = (bn + kRmax - 1) / kRmax;
  for (int64_t g = 0; g < groups; ++g) {   // rows split evenly: 32 = 11 + 11 + 10, not 12 + 12 + 8
    const int64_t i0 = g * bn / groups, i1 = (g + 1) * bn / groups;
    pair_tile_r<NV, kRmax>(int(i1 - i0), xp, ldx, col, b0, b1, v, bn, bk, i0, out);
  }
}

}  // namespace
#pragma GCC pop_options
#endif

void bsr_pair_panel_row(int nv, const uint32_t* xp, int64_t ldx, const int32_t* col, int64_t b0, int64_t b1,
                        const uint16_t* v, int64_t bn, int64_t bk, float* out) {
  TORCH_CHECK(bk % 2 == 0, "bsr_pair_panel_row: block_k must be even, got ", bk);
#if SPARSEKIT_BF16_DOT
  switch (nv) {
    case 1: return pair_row<1>(xp, ldx, col, b0, b1, v, bn, bk, out);
    case 2: return pair_row<2>(xp, ldx, col, b0, b1, v, bn, bk, out);
    case 4: return pair_row<4>(xp, ldx, col, b0, b1, v, bn, bk, out);
    default: TORCH_CHECK(false, "bsr_pair_panel_row: nv must be 1, 2 or 4, got ", nv);
  }
#else
  (void)nv, (void)xp, (void)ldx, (void)col, (void)b0, (void)b1, (void)v, (void)bn, (void)out;
  TORCH_CHECK(false, "bsr_pair_panel_row: AVX512-BF16 kernels are not built on this architecture");
#endif
}

}  // namespace sparsekit::cpu
