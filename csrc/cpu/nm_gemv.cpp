// The n:m product for few rows of x (decoding) on AVX-512 / AVX2, straight from the NM format: y = x @ W^T + bias
// with W's values [N, K/m*n] and uint8 positions, for n <= m/2 and m in {4, 8, 16, 32} (AVX2: 4, 8, 16).
//
// nm_mm's general path runs n:m as CSR and builds the CSR column array per call (2 bytes per kept value): at
// M = 1 that costs more than the product, and the gather GEMV then reads x by index one value at a time. Here a
// row is walked in windows of 32 columns: the window's 32n/m kept values (at most 16) and their positions are
// loaded, each position plus its group's base column indexes the window's 32 values of x (two registers,
// vpermt2ps), and one FMA adds the 16 products. Bytes per weight: (4 + 1) n/m for fp32 values, (2 + 1) n/m for
// bf16 (widened to fp32 in registers), against 4 or 2 dense.
#include "nm_gemv.h"

#include <ATen/Parallel.h>

#include <cstring>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "simd.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SPARSEKIT_X86 1
#else
#define SPARSEKIT_X86 0
#endif

namespace sparsekit::cpu {

bool nm_gemv_supported(Isa isa, int64_t M, int64_t n, int64_t m) {
#if SPARSEKIT_X86
  if (M < 1 || M > kNmGemvMaxRows || 2 * n > m) return false;
  return (isa == Isa::kAvx512 && (m == 4 || m == 8 || m == 16 || m == 32)) ||
         (isa == Isa::kAvx2 && (m == 4 || m == 8 || m == 16));
#else
  (void)isa, (void)M, (void)n, (void)m;
  return false;
#endif
}

#if SPARSEKIT_X86
namespace {

// Rows [r0, r1) of y for all M rows of x in tiles of up to 4 (a row of W stays in L1 between tiles):
// row(std::integral_constant<int, MT>, x tile, out tile, the row's positions, its first value, r).
template <typename Row>
void tiled_rows(int64_t M, int64_t Kp, const float* xp, float* out, int64_t ldo, const uint8_t* idx, int64_t kept,
                int64_t r0, int64_t r1, Row&& row) {
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t q0 = 0; q0 < M; q0 += 4) {
      const float* xq = xp + q0 * Kp;
      float* oq = out + q0 * ldo;
      const uint8_t* ir = idx + r * kept;
      switch (M - q0 >= 4 ? 4 : M - q0) {
        case 1: row(std::integral_constant<int, 1>(), xq, oq, ir, r * kept, r); break;
        case 2: row(std::integral_constant<int, 2>(), xq, oq, ir, r * kept, r); break;
        case 3: row(std::integral_constant<int, 3>(), xq, oq, ir, r * kept, r); break;
        default: row(std::integral_constant<int, 4>(), xq, oq, ir, r * kept, r);
      }
    }
  }
}

namespace avx512 {

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")

// L kept values at v (fp32, or bf16 bits widened), lanes >= L zero; never reads past them.
template <bool kBf16>
inline __m512 load_values(const void* v, int64_t e, __mmask16 lanes) {
  if constexpr (kBf16) {
    const __m256i raw = _mm256_maskz_loadu_epi16(lanes, static_cast<const uint16_t*>(v) + e);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  } else {
    return _mm512_maskz_loadu_ps(lanes, static_cast<const float*>(v) + e);
  }
}

// Row r of y for MT rows of x (xp: [MT][Kp] fp32, zero past K; Kp a multiple of 32) into out[q * ldo + r].
template <int MT, bool kBf16>
void row(const float* xp, int64_t Kp, const void* v, const uint8_t* ir, int64_t e0, int64_t windows,
         int64_t per_window, __m512i base, __mmask16 full, __mmask16 last, const float* bias, float* out,
         int64_t ldo, int64_t r) {
  __m512 acc[MT][2];
  for (int q = 0; q < MT; ++q) acc[q][0] = acc[q][1] = _mm512_setzero_ps();
  // window w into acc[.][A] (A a constant: the accumulators stay in registers)
  auto window = [&](int64_t w, __mmask16 lanes, auto a) {
    constexpr int A = decltype(a)::value;
    const int64_t e = w * per_window;
    const __m512i pos = _mm512_add_epi32(base, _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(lanes, ir + e)));
    const __m512 wv = load_values<kBf16>(v, e0 + e, lanes);
    for (int q = 0; q < MT; ++q) {
      const float* xw = xp + q * Kp + w * 32;
      // lanes past the window's kept values stay 0 (an inf or NaN elsewhere in x must not reach them)
      const __m512 xg = _mm512_maskz_permutex2var_ps(lanes, _mm512_loadu_ps(xw), pos, _mm512_loadu_ps(xw + 16));
      acc[q][A] = _mm512_fmadd_ps(wv, xg, acc[q][A]);
    }
  };
  int64_t w = 0;
  for (; w + 2 < windows; w += 2) {   // (full windows: the last one, maybe partial, is taken below)
    window(w, full, std::integral_constant<int, 0>());
    window(w + 1, full, std::integral_constant<int, 1>());
  }
  for (; w < windows; ++w) window(w, w + 1 < windows ? full : last, std::integral_constant<int, 0>());
  for (int q = 0; q < MT; ++q) {
    out[q * ldo + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[q][0], acc[q][1])) + (bias ? bias[r] : 0.f);
  }
}

// Rows [r0, r1) of y for all M rows of x, in tiles of up to 4 rows of x; a row of W stays in L1 between tiles.
template <bool kBf16>
void rows(const float* xp, int64_t Kp, int64_t M, const void* v, const uint8_t* idx, int64_t K, int64_t n,
          int64_t m, const float* bias, float* out, int64_t ldo, int64_t r0, int64_t r1) {
  const int64_t kept = K / m * n, per_window = 32 / m * n, windows = (K + 31) / 32;
  // lane l of a window holds kept value l, which sits in group l / n: its base column is (l / n) * m
  alignas(64) int32_t base_lanes[16];
  for (int l = 0; l < 16; ++l) base_lanes[l] = int32_t(l / n * m);
  const __m512i base = _mm512_load_si512(base_lanes);
  const __mmask16 full = __mmask16((1u << per_window) - 1u);
  const int64_t last_groups = (K - (windows - 1) * 32) / m;                 // groups in the last window
  const __mmask16 last = __mmask16((1u << (last_groups * n)) - 1u);
  tiled_rows(M, Kp, xp, out, ldo, idx, kept, r0, r1, [&](auto mt, const float* xq, float* oq, const uint8_t* ir,
                                                           int64_t e0, int64_t r) {
    row<decltype(mt)::value, kBf16>(xq, Kp, v, ir, e0, windows, per_window, base, full, last, bias, oq, ldo, r);
  });
}

#pragma GCC pop_options

}  // namespace avx512

// ------------------------------------------------------------------------------------------------ AVX2
// The same over windows of 16 columns (m in 4, 8, 16; at most 8 kept values per window): each position picks from
// the window's two registers of x (vpermps on both, a blend on position >= 8).
namespace avx2 {

#pragma GCC push_options
#pragma GCC target("avx2,fma")

// L (<= 8) kept values from position e, as fp32 lanes (lanes >= L zero); never reads past them.
template <bool kBf16>
inline __m256 load_values(const void* v, int64_t e, int L) {
  if constexpr (kBf16) {
    alignas(16) uint16_t tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(tmp, static_cast<const uint16_t*>(v) + e, sizeof(uint16_t) * L);
    const __m256i w = _mm256_cvtepu16_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(tmp)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  } else {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_maskload_ps(static_cast<const float*>(v) + e, _mm256_cmpgt_epi32(_mm256_set1_epi32(L), lane));
  }
}

template <int MT, bool kBf16>
void row(const float* xp, int64_t Kp, const void* v, const uint8_t* ir, int64_t e0, int64_t windows, int per_window,
         int last_lanes, __m256i base, const float* bias, float* out, int64_t ldo, int64_t r) {
  __m256 acc[MT][2];
  for (int q = 0; q < MT; ++q) acc[q][0] = acc[q][1] = _mm256_setzero_ps();
  auto window = [&](int64_t w, int L, auto a) {
    constexpr int A = decltype(a)::value;
    const int64_t e = w * per_window;
    uint64_t raw = 0;
    std::memcpy(&raw, ir + e, L);
    const __m256i pos = _mm256_add_epi32(base, _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(int64_t(raw))));
    const __m256 hi = _mm256_castsi256_ps(_mm256_cmpgt_epi32(pos, _mm256_set1_epi32(7)));
    const __m256 used = _mm256_castsi256_ps(
        _mm256_cmpgt_epi32(_mm256_set1_epi32(L), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
    const __m256 wv = load_values<kBf16>(v, e0 + e, L);
    for (int q = 0; q < MT; ++q) {
      const float* xw = xp + q * Kp + w * 16;
      // lanes past the window's kept values stay 0 (an inf or NaN elsewhere in x must not reach them)
      const __m256 xg = _mm256_and_ps(used, _mm256_blendv_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(xw), pos),
                                                             _mm256_permutevar8x32_ps(_mm256_loadu_ps(xw + 8), pos),
                                                             hi));
      acc[q][A] = _mm256_fmadd_ps(wv, xg, acc[q][A]);
    }
  };
  int64_t w = 0;
  for (; w + 2 < windows; w += 2) {
    window(w, per_window, std::integral_constant<int, 0>());
    window(w + 1, per_window, std::integral_constant<int, 1>());
  }
  for (; w < windows; ++w) window(w, w + 1 < windows ? per_window : last_lanes, std::integral_constant<int, 0>());
  for (int q = 0; q < MT; ++q) {
    const __m256 s = _mm256_add_ps(acc[q][0], acc[q][1]);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    out[q * ldo + r] = _mm_cvtss_f32(h) + (bias ? bias[r] : 0.f);
  }
}

template <bool kBf16>
void rows(const float* xp, int64_t Kp, int64_t M, const void* v, const uint8_t* idx, int64_t K, int64_t n,
          int64_t m, const float* bias, float* out, int64_t ldo, int64_t r0, int64_t r1) {
  const int64_t kept = K / m * n, windows = (K + 15) / 16;
  const int per_window = int(16 / m * n), last_lanes = int((K - (windows - 1) * 16) / m * n);
  alignas(32) int32_t base_lanes[8];
  for (int l = 0; l < 8; ++l) base_lanes[l] = int32_t(l / n * m);
  const __m256i base = _mm256_load_si256(reinterpret_cast<const __m256i*>(base_lanes));
  tiled_rows(M, Kp, xp, out, ldo, idx, kept, r0, r1, [&](auto mt, const float* xq, float* oq, const uint8_t* ir,
                                                           int64_t e0, int64_t r) {
    row<decltype(mt)::value, kBf16>(xq, Kp, v, ir, e0, windows, per_window, last_lanes, base, bias, oq, ldo, r);
  });
}

#pragma GCC pop_options

}  // namespace avx2
}  // namespace

void nm_gemv(Isa isa, const float* x, int64_t M, int64_t K, const void* v, bool bf16, const uint8_t* idx, int64_t N,
             int64_t n, int64_t m, const float* bias, float* out) {
  // x padded with zeros to whole windows of 32 columns (a partial last window's positions stay below K)
  const int64_t Kp = (K + 31) / 32 * 32;
  std::vector<float> xp(size_t(M * Kp), 0.f);
  for (int64_t q = 0; q < M; ++q) std::memcpy(xp.data() + q * Kp, x + q * K, sizeof(float) * K);
  const bool wide = isa == Isa::kAvx512;
  at::parallel_for(0, N, grain_for((K / m * n + 1) * M), [&](int64_t r0, int64_t r1) {
    if (wide) {
      return bf16 ? avx512::rows<true>(xp.data(), Kp, M, v, idx, K, n, m, bias, out, N, r0, r1)
                  : avx512::rows<false>(xp.data(), Kp, M, v, idx, K, n, m, bias, out, N, r0, r1);
    }
    return bf16 ? avx2::rows<true>(xp.data(), Kp, M, v, idx, K, n, m, bias, out, N, r0, r1)
                : avx2::rows<false>(xp.data(), Kp, M, v, idx, K, n, m, bias, out, N, r0, r1);
  });
}
#else
void nm_gemv(Isa, const float*, int64_t, int64_t, const void*, bool, const uint8_t*, int64_t, int64_t, int64_t,
             const float*, float*) {}
#endif

}  // namespace sparsekit::cpu
