// The SIMD micro-kernels of simd.h, compiled for AVX-512, AVX2+FMA and portably, chosen at run time.
// Only the functions inside the `#pragma GCC target` regions use the wider ISA; nothing else in the
// extension does, so the library still loads and runs on any x86-64 (and builds on arm64: portable only).
#include "simd.h"

#include <torch/library.h>

#include "amx.h"
#include "bf16_dot.h"

#include <cctype>
#include <cstdlib>
#include <cstring>
#include <string>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SPARSEKIT_X86 1
#else
#define SPARSEKIT_X86 0
#endif

namespace sparsekit::cpu {

// ---------------------------------------------------------------------------------------- portable
namespace portable {
typedef float vec __attribute__((vector_size(16)));
constexpr int kW = 4, kAcc = 12;
inline vec vzero() { return vec{0.f, 0.f, 0.f, 0.f}; }
inline vec vload(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void vstore(float* p, vec v) { std::memcpy(p, &v, sizeof(v)); }
inline vec vbcast(float f) { return vec{f, f, f, f}; }
inline vec vfma(vec a, vec b, vec c) { return a * b + c; }
inline float hsum(vec v) { return (v[0] + v[1]) + (v[2] + v[3]); }
inline vec vload_bf16(const uint16_t* p) {
  vec v;
  for (int i = 0; i < kW; ++i) {
    const uint32_t u = uint32_t(p[i]) << 16;
    std::memcpy(&v[i], &u, sizeof(float));
  }
  return v;
}
inline void tr8x8(const float* s, int64_t lds, const float* bias, float* d, int64_t ldd) {
  for (int j = 0; j < 8; ++j)
    for (int i = 0; i < 8; ++i) d[j * ldd + i] = s[i * lds + j] + (bias ? bias[i] : 0.f);
}
#include "spmm_kernels.inc"
}  // namespace portable

#if SPARSEKIT_X86
// ------------------------------------------------------------------------------------------- AVX2
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
typedef __m256 vec;
constexpr int kW = 8, kAcc = 12;
inline vec vzero() { return _mm256_setzero_ps(); }
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
inline vec vbcast(float f) { return _mm256_set1_ps(f); }
inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline float hsum(vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline vec vload_bf16(const uint16_t* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
inline void tr8x8(const float* s, int64_t lds, const float* bias, float* d, int64_t ldd) {
  __m256 r0 = _mm256_loadu_ps(s), r1 = _mm256_loadu_ps(s + lds), r2 = _mm256_loadu_ps(s + 2 * lds),
         r3 = _mm256_loadu_ps(s + 3 * lds), r4 = _mm256_loadu_ps(s + 4 * lds), r5 = _mm256_loadu_ps(s + 5 * lds),
         r6 = _mm256_loadu_ps(s + 6 * lds), r7 = _mm256_loadu_ps(s + 7 * lds);
  __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1), t2 = _mm256_unpacklo_ps(r2, r3),
         t3 = _mm256_unpackhi_ps(r2, r3), t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
         t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  r0 = _mm256_shuffle_ps(t0, t2, 0x44);
  r1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  r2 = _mm256_shuffle_ps(t1, t3, 0x44);
  r3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  r4 = _mm256_shuffle_ps(t4, t6, 0x44);
  r5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  r6 = _mm256_shuffle_ps(t5, t7, 0x44);
  r7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  const __m256 b = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
  _mm256_storeu_ps(d, _mm256_add_ps(b, _mm256_permute2f128_ps(r0, r4, 0x20)));
  _mm256_storeu_ps(d + ldd, _mm256_add_ps(b, _mm256_permute2f128_ps(r1, r5, 0x20)));
  _mm256_storeu_ps(d + 2 * ldd, _mm256_add_ps(b, _mm256_permute2f128_ps(r2, r6, 0x20)));
  _mm256_storeu_ps(d + 3 * ldd, _mm256_add_ps(b, _mm256_permute2f128_ps(r3, r7, 0x20)));
  _mm256_storeu_ps(d + 4 * ldd, _mm256_add_ps(b, _mm256_permute2f128_ps(r0, r4, 0x31)));
  _mm256_storeu_ps(d + 5 * ldd, _mm256_add_ps(b, _mm256_permute2f128_ps(r1, r5, 0x31)));
  _mm256_storeu_ps(d + 6 * ldd, _mm256_add_ps(b, _mm256_permute2f128_ps(r2, r6, 0x31)));
  _mm256_storeu_ps(d + 7 * ldd, _mm256_add_ps(b, _mm256_permute2f128_ps(r3, r7, 0x31)));
}
#include "spmm_kernels.inc"
}  // namespace avx2
#pragma GCC pop_options

// ----------------------------------------------------------------------------------------- AVX-512
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
namespace avx512 {
typedef __m512 vec;
constexpr int kW = 16, kAcc = 24;
inline vec vzero() { return _mm512_setzero_ps(); }
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vec v) { _mm512_storeu_ps(p, v); }
inline vec vbcast(float f) { return _mm512_set1_ps(f); }
inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline float hsum(vec v) { return _mm512_reduce_add_ps(v); }
inline vec vload_bf16(const uint16_t* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
using avx2::tr8x8;  // 256-bit transposes: the AVX2 code is the AVX-512 one too
#include "spmm_kernels.inc"
}  // namespace avx512
#pragma GCC pop_options
#endif

// ------------------------------------------------------------------------------------- selection
namespace {
Isa detect() {
#if SPARSEKIT_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    return Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kScalar;
}
}  // namespace

const char* requested_isa() {
  const char* env = std::getenv("SPARSEKIT_CPU_ISA");  // read per call: tests switch it at run time
  if (env == nullptr || *env == '\0') return "";
  std::string s(env);
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  for (const char* known : {"amx", "avx512", "avx2", "scalar"}) {
    if (s == known) return known;
  }
  TORCH_WARN_ONCE("SPARSEKIT_CPU_ISA=", env, " is not one of amx, avx512, avx2, scalar; ignored (the best ISA "
                  "this CPU supports is used)");
  return "";
}

Isa active_isa() {
  static const Isa best = detect();
  const std::string s = requested_isa();
  if (s.empty()) return best;
  const Isa want = s == "amx" || s == "avx512" ? Isa::kAvx512 : s == "avx2" ? Isa::kAvx2 : Isa::kScalar;
  return static_cast<int>(want) < static_cast<int>(best) ? want : best;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

int vec_floats(Isa isa) { return isa == Isa::kAvx512 ? 16 : isa == Isa::kAvx2 ? 8 : 4; }
int acc_regs(Isa isa) { return isa == Isa::kAvx512 ? 24 : 12; }

#if SPARSEKIT_X86
#define SPARSEKIT_ISA_CALL(FN, ...)                                 \
  switch (isa) {                                                   \
    case Isa::kAvx512: return avx512::FN(__VA_ARGS__);             \
    case Isa::kAvx2: return avx2::FN(__VA_ARGS__);                 \
    default: return portable::FN(__VA_ARGS__);                     \
  }
#else
#define SPARSEKIT_ISA_CALL(FN, ...) return portable::FN(__VA_ARGS__);
#endif

void bsr_panel_row(Isa isa, int nv, const float* xp, int64_t ldx, const int64_t* rowoff, const int32_t* col,
                   int64_t b0, int64_t b1, const void* v, WKind wk, int64_t bn, int64_t bk, float* out) {
  SPARSEKIT_ISA_CALL(bsr_panel_row, nv, xp, ldx, rowoff, col, b0, b1, v, wk, bn, bk, out)
}

void bsr_kblock_rows(Isa isa, int nv, const float* xp, const int32_t* crow, const int32_t* col, int64_t r0,
                     int64_t r1, const void* v, WKind wk, int64_t bk, int64_t cols, int64_t kcb, int64_t* cur,
                     float* out, const char* ypf, int64_t ypf_ld, int64_t ypf_bytes, int64_t ypf_rows) {
  SPARSEKIT_ISA_CALL(bsr_kblock_rows, nv, xp, crow, col, r0, r1, v, wk, bk, cols, kcb, cur, out, ypf, ypf_ld, ypf_bytes,
                     ypf_rows)
}

void bsr_gemv_row(Isa isa, const float* x, const int32_t* col, int64_t b0, int64_t b1, const void* v, WKind wk,
                  int64_t bn, int64_t bk, float* out) {
  SPARSEKIT_ISA_CALL(bsr_gemv_row, x, col, b0, b1, v, wk, bn, bk, out)
}

void bsr_nvec_row(Isa isa, const float* x, int64_t ldx, int64_t mrows, const int32_t* col, int64_t b0, int64_t b1,
                  const float* wt, int64_t bn, int64_t bk, const float* bias, float* y, int64_t ldy) {
  SPARSEKIT_ISA_CALL(bsr_nvec_row, x, ldx, mrows, col, b0, b1, wt, bn, bk, bias, y, ldy)
}

void transpose(Isa isa, const float* src, int64_t lds, int64_t rows, int64_t cols, const float* bias, float* dst,
               int64_t ldd) {
  SPARSEKIT_ISA_CALL(transpose, src, lds, rows, cols, bias, dst, ldd)
}

void csr_panel_rows(Isa isa, int nv, const float* xp, const int64_t* rowoff, const int32_t* ptr, const int16_t* idx,
                    const void* v, WKind wk, int64_t r0, int64_t r1, float* out) {
  SPARSEKIT_ISA_CALL(csr_panel_rows<int16_t>, nv, xp, rowoff, ptr, idx, v, wk, r0, r1, out)
}

void csr_panel_rows(Isa isa, int nv, const float* xp, const int64_t* rowoff, const int32_t* ptr, const int32_t* idx,
                    const void* v, WKind wk, int64_t r0, int64_t r1, float* out) {
  SPARSEKIT_ISA_CALL(csr_panel_rows<int32_t>, nv, xp, rowoff, ptr, idx, v, wk, r0, r1, out)
}

void csr_sddmm_rows(Isa isa, const float* dyT, const float* xT, int64_t M, const int32_t* ptr, const int16_t* idx,
                    int64_t r0, int64_t r1, float* out) {
  SPARSEKIT_ISA_CALL(csr_sddmm_rows<int16_t>, dyT, xT, M, ptr, idx, r0, r1, out)
}

void csr_sddmm_rows(Isa isa, const float* dyT, const float* xT, int64_t M, const int32_t* ptr, const int32_t* idx,
                    int64_t r0, int64_t r1, float* out) {
  SPARSEKIT_ISA_CALL(csr_sddmm_rows<int32_t>, dyT, xT, M, ptr, idx, r0, r1, out)
}

}  // namespace sparsekit::cpu

namespace {
std::string cpu_kernel_isa() {
  using namespace sparsekit::cpu;
  return std::string(isa_name(active_isa())) + (amx_enabled() ? "+amx" : "") + (bf16_dot_enabled() ? "+bf16dot" : "");
}
}  // namespace

TORCH_LIBRARY_IMPL(sparsekit, CompositeExplicitAutograd, m) { m.impl("cpu_kernel_isa", &cpu_kernel_isa); }
