// CPU kernel of sparsekit::csr_bitmap_mm: y = x @ W^T + bias for a CSR weight that carries a bitmap of its
// pattern (sparsekit.formats.CSR.bitmap), for skinny x: LLM decoding, up to kMaxRows rows (more: csr_mm).
//
// The gather kernels of csr_spmm.cpp fetch x[col[e]] per stored entry: at M = 1 that is one scalar
// multiply-add and a 2-byte index per entry, slower than the dense GEMV down to ~80% sparsity. Here each row's
// values are expanded into dense vectors in registers ("load sparse, compute dense", as Flash-LLM does in
// shared memory on GPUs): a 16-bit piece of the bitmap says which of 16 columns are stored, the next popcount
// values are loaded and expanded into those lanes (AVX-512 vexpandps; vpexpandw and vdpbf16ps for bfloat16; an
// 8-lane permute table on AVX2), and the vector is multiplied with 16 contiguous values of x. The work per row
// is K/16 vector operations whatever the density, and the bytes per weight are 4d + 1/8 (fp32) or 2d + 1/8
// (bf16) at density d: at small M the product runs at memory speed down to ~90% sparsity, where the gather
// kernels, whose work shrinks with d, catch up.
//
// bitmap: uint8 [N, 8 * ceil(K / 64)], bit k % 8 of byte k / 8 of row r set iff W[r, k] is stored; read as
// 64-bit words. The values of row r are values[crow[r] : crow[r + 1]] in column order (CSR's own). Each row's
// bit count is checked against crow (and bits past K against 0) before the row is read, so index data that
// disagrees raises instead of reading out of bounds; that the bits sit in the columns col_indices names is
// CSR.validate()'s check (O(N * K / 8)), not this op's. Like the dense product (and unlike the gather kernels,
// which skip unstored columns), an inf or NaN anywhere in a row of x makes its outputs NaN (0 * inf).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <atomic>
#include <cstring>
#include <optional>
#include <type_traits>

#include "checks.h"
#include "csr.h"
#include "simd.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SPARSEKIT_X86 1
#else
#define SPARSEKIT_X86 0
#endif

namespace {

using namespace sparsekit::cpu;

constexpr int64_t kTile = 8;              // rows of x per pass over a row of W (accumulators: kTile vectors)
constexpr int64_t kMaxRows = 8;           // above this M csr_mm runs (its panel kernel, vectorized over M)
constexpr int64_t kPrefetchBytes = 2048;  // how far ahead of the expand-loads the values are prefetched

// What a kernel needs: x packed as xp [Mp][ldx] (fp32, or bf16 bits for the dot-product path), zero past K and
// past M, with Mp a multiple of the last tile; out [M][N] fp32, bias added.
struct Job {
  const void* xp;
  int64_t ldx, M;
  const uint64_t* bm;
  int64_t words;
  const int32_t* crow;
  const void* v;
  int64_t nnz;  // values past v[nnz - 1] are never read (a full-width load is taken only where it fits)
  const float* bias;
  float* out;
  int64_t N;
};

// Bytes 8w .. 8w + 7 of a bitmap row as one word, bit k % 64 = column 64w + k % 64, on any byte order.
inline uint64_t word(const uint64_t* p) {
  uint64_t w;
  std::memcpy(&w, p, sizeof(w));
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  w = __builtin_bswap64(w);
#endif
  return w;
}

// Rows of x per tile: full tiles of kTile, then the remainder rounded up to a power of two (xp is padded to it).
inline int tile_rows(int64_t left) { return left > 4 ? int(kTile) : left > 2 ? 4 : int(left); }

inline int64_t padded_rows(int64_t M) {
  const int64_t full = M / kTile * kTile, rem = M - full;
  return full + (rem ? tile_rows(rem) : 0);
}

// One ISA's kernel for a row of W times a tile of 1, 2, 4 or kTile rows of x from row m0.
using RowFn = void (*)(const Job&, int64_t r, int64_t m0);
struct RowKernels {
  RowFn tile1, tile2, tile4, tile8;
};

// Rows [r0, r1) of y: every tile of x per row of W, while the row's values are in L1.
void tiled_rows(const RowKernels& k, const Job& j, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t m0 = 0; m0 < j.M; m0 += kTile) {
      const int t = tile_rows(j.M - m0);
      (t == 1 ? k.tile1 : t == 2 ? k.tile2 : t == 4 ? k.tile4 : k.tile8)(j, r, m0);
    }
  }
}

// ------------------------------------------------------------------------------------------ portable
// float64: plain loops over the set bits, y written directly.
void rows_double(const double* xp, int64_t ldx, int64_t M, const uint64_t* bm, int64_t words, const int32_t* crow,
                 const double* v, const double* bias, double* y, int64_t N, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const uint64_t* b = bm + r * words;
    for (int64_t m = 0; m < M; ++m) {
      const double* xm = xp + m * ldx;
      const double* p = v + crow[r];
      double acc = 0;
      for (int64_t w = 0; w < words; ++w) {
        uint64_t bits = word(b + w);
        while (bits) {
          acc += *p++ * xm[w * 64 + __builtin_ctzll(bits)];
          bits &= bits - 1;
        }
      }
      y[m * N + r] = acc + (bias ? bias[r] : 0.0);
    }
  }
}

inline float bf16_to_f32(uint16_t u) {
  const uint32_t b = uint32_t(u) << 16;
  float f;
  std::memcpy(&f, &b, sizeof(f));
  return f;
}

// The portable kernel over fp32 values, or raw bf16 bits (x packed as fp32 either way).
void rows_portable(const Job& j, bool bf16, int64_t r0, int64_t r1) {
  const float* xp = static_cast<const float*>(j.xp);
  for (int64_t r = r0; r < r1; ++r) {
    const uint64_t* b = j.bm + r * j.words;
    for (int64_t m = 0; m < j.M; ++m) {
      const float* xm = xp + m * j.ldx;
      int64_t e = j.crow[r];
      float acc = 0.f;
      for (int64_t w = 0; w < j.words; ++w) {
        uint64_t bits = word(b + w);
        while (bits) {
          const int k = __builtin_ctzll(bits);
          const float val = bf16 ? bf16_to_f32(static_cast<const uint16_t*>(j.v)[e]) : static_cast<const float*>(j.v)[e];
          acc += val * xm[w * 64 + k];
          ++e;
          bits &= bits - 1;
        }
      }
      j.out[m * j.N + r] = acc + (j.bias ? j.bias[r] : 0.f);
    }
  }
}

#if SPARSEKIT_X86
// ---------------------------------------------------------------------------------------------- AVX2
#pragma GCC push_options
#pragma GCC target("avx2,fma,popcnt")
namespace avx2 {

// kExpand[mask] = for each lane of an 8-lane vector, the rank of its bit among the set bits of mask (the
// position of its value in the packed run), 7 for a clear bit (zeroed by the lane mask afterwards).
struct ExpandTable {
  alignas(32) int32_t idx[256][8];
  ExpandTable() {
    for (int m = 0; m < 256; ++m) {
      int rank = 0;
      for (int l = 0; l < 8; ++l) idx[m][l] = (m >> l) & 1 ? rank++ : 7;
    }
  }
};
const ExpandTable& expand_table() {
  static const ExpandTable t;
  return t;
}

// The next n packed values as 8 fp32 lanes (lanes >= n unspecified); never reads past p + n.
template <bool kBf16>
inline __m256 load8(const void* base, int64_t e, int n, int64_t nnz) {  // (n: values left to take, <= 8)
  if constexpr (kBf16) {
    const uint16_t* p = static_cast<const uint16_t*>(base) + e;
    __m128i raw;
    if (e + 8 <= nnz) {
      raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    } else {
      alignas(16) uint16_t tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      std::memcpy(tmp, p, sizeof(uint16_t) * n);
      raw = _mm_load_si128(reinterpret_cast<const __m128i*>(tmp));
    }
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
  } else {
    const float* p = static_cast<const float*>(base) + e;
    if (e + 8 <= nnz) return _mm256_loadu_ps(p);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane));  // faults suppressed past n
  }
}

inline __m256 expand8(__m256 packed, unsigned mask) {
  const __m256i bitsel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i on = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(int(mask)), bitsel), bitsel);
  const __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(expand_table().idx[mask]));
  return _mm256_and_ps(_mm256_permutevar8x32_ps(packed, idx), _mm256_castsi256_ps(on));
}

// MT < 4 keeps two accumulators per row of x (FMA latency); 8 rows one each (16 ymm registers in all).
template <int MT, bool kBf16>
void row(const Job& j, int64_t r, int64_t m0) {
  constexpr int NQ = MT >= 4 ? 1 : 2;
  const float* xp = static_cast<const float*>(j.xp) + m0 * j.ldx;
  const uint64_t* b = j.bm + r * j.words;
  int64_t e = j.crow[r];
  __m256 acc[MT][NQ];
  for (int m = 0; m < MT; ++m)
    for (int q = 0; q < NQ; ++q) acc[m][q] = _mm256_setzero_ps();
  for (int64_t w = 0; w < j.words; ++w) {
    const uint64_t bits = word(b + w);
    if (bits == 0) continue;
    const float* xw = xp + w * 64;
    for (int q = 0; q < 8; ++q) {
      const unsigned mask = unsigned(bits >> (8 * q)) & 0xFF;
      const int n = __builtin_popcount(mask);
      const __m256 wv = expand8(load8<kBf16>(j.v, e, n, j.nnz), mask);
      e += n;
      for (int m = 0; m < MT; ++m) {
        acc[m][q % NQ] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xw + m * j.ldx + 8 * q), acc[m][q % NQ]);
      }
    }
  }
  for (int m = 0; m < MT && m0 + m < j.M; ++m) {
    __m256 s = acc[m][0];
    for (int q = 1; q < NQ; ++q) s = _mm256_add_ps(s, acc[m][q]);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    j.out[(m0 + m) * j.N + r] = _mm_cvtss_f32(h) + (j.bias ? j.bias[r] : 0.f);
  }
}

// The row kernels for each tile size (tiled_rows).
template <bool kBf16>
constexpr RowKernels kernels() { return {&row<1, kBf16>, &row<2, kBf16>, &row<4, kBf16>, &row<kTile, kBf16>}; }

}  // namespace avx2
#pragma GCC pop_options

// ------------------------------------------------------------------------------------------- AVX-512
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,popcnt")
namespace avx512 {

// The 16 values of a 16-column piece with the given mask, starting at packed position e (never reading past
// v[nnz - 1]): loaded, then expanded into the mask's lanes. The load stays a separate instruction: GCC would fold
// it into a memory-operand vexpandps, several times slower on Sapphire Rapids (the plain load is also faster than
// a masked one, so it is taken wherever 16 values fit). bf16 bits are loaded masked, widened and expanded.
template <bool kBf16>
inline __m512 piece(const void* v, int64_t e, int64_t nnz, unsigned mask) {
  const int n = __builtin_popcount(mask);
  if constexpr (kBf16) {
    const __m256i raw = _mm256_maskz_loadu_epi16(__mmask16((1u << n) - 1u), static_cast<const uint16_t*>(v) + e);
    const __m512i wide = _mm512_maskz_expand_epi32(__mmask16(mask), _mm512_cvtepu16_epi32(raw));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  } else {
    const float* p = static_cast<const float*>(v) + e;
    __m512 raw = e + 16 <= nnz ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(__mmask16((1u << n) - 1u), p);
    __asm__("" : "+v"(raw));
    return _mm512_maskz_expand_ps(__mmask16(mask), raw);
  }
}

// MT rows of x from m0: per 64-bit word four pieces of 16 columns; the positions of pieces 1-3 come from
// popcounts of the same word, so only one add per word is serial. MT < 4 keeps 4 / MT accumulators per row of x
// to hide the FMA latency.
template <int MT, bool kBf16>
void row(const Job& j, int64_t r, int64_t m0) {
  constexpr int NQ = MT >= 4 ? 1 : 4 / MT;
  const float* xp = static_cast<const float*>(j.xp) + m0 * j.ldx;
  const uint64_t* b = j.bm + r * j.words;
  int64_t e = j.crow[r];
  __m512 acc[MT][NQ];
  for (int m = 0; m < MT; ++m)
    for (int q = 0; q < NQ; ++q) acc[m][q] = _mm512_setzero_ps();
  for (int64_t w = 0; w < j.words; ++w) {
    const uint64_t bits = word(b + w);
    if (bits == 0) continue;
    const int64_t c1 = _mm_popcnt_u64(bits & 0xFFFFull), c2 = _mm_popcnt_u64(bits & 0xFFFFFFFFull),
                  c3 = _mm_popcnt_u64(bits & 0xFFFFFFFFFFFFull);
    _mm_prefetch(static_cast<const char*>(j.v) + (e << (kBf16 ? 1 : 2)) + kPrefetchBytes, _MM_HINT_T0);
    const __m512 w0 = piece<kBf16>(j.v, e, j.nnz, unsigned(bits) & 0xFFFF);
    const __m512 w1 = piece<kBf16>(j.v, e + c1, j.nnz, unsigned(bits >> 16) & 0xFFFF);
    const __m512 w2 = piece<kBf16>(j.v, e + c2, j.nnz, unsigned(bits >> 32) & 0xFFFF);
    const __m512 w3 = piece<kBf16>(j.v, e + c3, j.nnz, unsigned(bits >> 48));
    e += _mm_popcnt_u64(bits);
    const float* xw = xp + w * 64;
    for (int m = 0; m < MT; ++m) {
      const float* xm = xw + m * j.ldx;
      acc[m][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xm), acc[m][0]);
      acc[m][1 % NQ] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xm + 16), acc[m][1 % NQ]);
      acc[m][2 % NQ] = _mm512_fmadd_ps(w2, _mm512_loadu_ps(xm + 32), acc[m][2 % NQ]);
      acc[m][3 % NQ] = _mm512_fmadd_ps(w3, _mm512_loadu_ps(xm + 48), acc[m][3 % NQ]);
    }
  }
  for (int m = 0; m < MT && m0 + m < j.M; ++m) {
    __m512 s = acc[m][0];
    for (int q = 1; q < NQ; ++q) s = _mm512_add_ps(s, acc[m][q]);
    j.out[(m0 + m) * j.N + r] = _mm512_reduce_add_ps(s) + (j.bias ? j.bias[r] : 0.f);
  }
}

// The row kernels for each tile size (tiled_rows).
template <bool kBf16>
constexpr RowKernels kernels() { return {&row<1, kBf16>, &row<2, kBf16>, &row<4, kBf16>, &row<kTile, kBf16>}; }

}  // namespace avx512
#pragma GCC pop_options

// ------------------------------------------------------------------------- AVX-512 BF16 dot products
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vbmi2,avx2,fma,popcnt")
namespace avx512bf16 {

// bf16 values and bf16 x: a 64-bit word is two pieces of 32 columns; vpexpandw places a piece's values,
// vdpbf16ps multiplies pairs of columns and adds both products to one fp32 lane (16 lanes per piece). Words go
// in pairs so that MT < 4 gets 4 / MT accumulators per row of x, indexed at compile time (in registers).
template <int MT, int Q0, int Q1>
inline void word_dot(const Job& j, const uint16_t* v, int64_t& e, uint64_t bits, const uint16_t* xw,
                     __m512 (&acc)[MT][MT >= 4 ? 1 : 4 / MT]) {
  if (bits == 0) return;
  const __mmask32 lo = __mmask32(bits), hi = __mmask32(bits >> 32);
  const int64_t c1 = _mm_popcnt_u32(unsigned(lo)), c2 = _mm_popcnt_u64(bits);
  _mm_prefetch(reinterpret_cast<const char*>(v + e) + kPrefetchBytes, _MM_HINT_T0);
  __m512i raw0 = _mm512_maskz_loadu_epi16(__mmask32((1ull << c1) - 1), v + e);
  __m512i raw1 = _mm512_maskz_loadu_epi16(__mmask32((1ull << (c2 - c1)) - 1), v + e + c1);
  __asm__("" : "+v"(raw0), "+v"(raw1));  // keep the loads apart: a memory-operand vpexpandw is far slower
  const __m512i w0 = _mm512_maskz_expand_epi16(lo, raw0);
  const __m512i w1 = _mm512_maskz_expand_epi16(hi, raw1);
  e += c2;
  for (int m = 0; m < MT; ++m) {
    const uint16_t* xm = xw + m * j.ldx;
    acc[m][Q0] = _mm512_dpbf16_ps(acc[m][Q0], (__m512bh)w0, (__m512bh)_mm512_loadu_si512(xm));
    acc[m][Q1] = _mm512_dpbf16_ps(acc[m][Q1], (__m512bh)w1, (__m512bh)_mm512_loadu_si512(xm + 32));
  }
}

template <int MT>
void row(const Job& j, int64_t r, int64_t m0) {
  constexpr int NQ = MT >= 4 ? 1 : 4 / MT;
  const uint16_t* xp = static_cast<const uint16_t*>(j.xp) + m0 * j.ldx;
  const uint16_t* v = static_cast<const uint16_t*>(j.v);
  const uint64_t* b = j.bm + r * j.words;
  int64_t e = j.crow[r];
  __m512 acc[MT][NQ];
  for (int m = 0; m < MT; ++m)
    for (int q = 0; q < NQ; ++q) acc[m][q] = _mm512_setzero_ps();
  int64_t w = 0;
  for (; w + 2 <= j.words; w += 2) {
    word_dot<MT, 0, 1 % NQ>(j, v, e, word(b + w), xp + w * 64, acc);
    word_dot<MT, 2 % NQ, 3 % NQ>(j, v, e, word(b + w + 1), xp + (w + 1) * 64, acc);
  }
  if (w < j.words) word_dot<MT, 0, 1 % NQ>(j, v, e, word(b + w), xp + w * 64, acc);
  for (int m = 0; m < MT && m0 + m < j.M; ++m) {
    __m512 s = acc[m][0];
    for (int q = 1; q < NQ; ++q) s = _mm512_add_ps(s, acc[m][q]);
    j.out[(m0 + m) * j.N + r] = _mm512_reduce_add_ps(s) + (j.bias ? j.bias[r] : 0.f);
  }
}

constexpr RowKernels kernels() { return {&row<1>, &row<2>, &row<4>, &row<kTile>}; }

}  // namespace avx512bf16
#pragma GCC pop_options

bool has_bf16_dot() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vbmi2");
  }();
  return ok;
}
#endif

// ------------------------------------------------------------------------------------------- checks
// Set bits in a row's words: the popcnt instruction where the CPU has it (without it GCC calls a table-based
// libgcc routine, ~10x slower: as slow as the product itself at 90% sparsity).
#if SPARSEKIT_X86
__attribute__((target("popcnt"))) int64_t row_bits_popcnt(const uint64_t* b, int64_t words) {
  int64_t count = 0;
  for (int64_t w = 0; w < words; ++w) count += _mm_popcnt_u64(word(b + w));
  return count;
}
#endif

int64_t row_bits(const uint64_t* b, int64_t words) {
#if SPARSEKIT_X86
  static const bool popcnt = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("popcnt");
  }();
  if (popcnt) return row_bits_popcnt(b, words);
#endif
  int64_t count = 0;
  for (int64_t w = 0; w < words; ++w) count += __builtin_popcountll(word(b + w));
  return count;
}

// Every row's bit count must equal its run of values in crow, and no bit may lie past K; returns the first bad
// row, or -1. O(N * K / 64), read again by the product right after (the bitmap is 1/32 of the fp32 weight).
int64_t first_bad_row(const uint64_t* bm, int64_t words, const int32_t* crow, int64_t N, int64_t K) {
  const uint64_t tail = K % 64 ? ~0ull << (K % 64) : 0ull;
  std::atomic<int64_t> bad{-1};
  at::parallel_for(0, N, grain_for(words), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint64_t* b = bm + r * words;
      const int64_t count = row_bits(b, words);
      const bool past_k = words > 0 && (word(b + words - 1) & tail) != 0;
      if (past_k || int64_t(crow[r + 1]) - int64_t(crow[r]) != count) {
        int64_t cur = bad.load();
        while ((cur < 0 || r < cur) && !bad.compare_exchange_weak(cur, r)) {
        }
        return;
      }
    }
  });
  return bad.load();
}

void check_args(const char* op, const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                const at::Tensor& bitmap, const at::Tensor& values, int64_t n) {
  check_operands(op, x, "x", 2, values, 1);
  check_tensor(op, crow, "crow_indices", 1);
  TORCH_CHECK(crow.scalar_type() == at::kInt, op, ": crow_indices must have dtype torch.int32, got ",
              dtype_name(crow.scalar_type()));
  TORCH_CHECK(crow.is_contiguous(), op, ": crow_indices must be contiguous");
  TORCH_CHECK(n >= 0, op, ": n must be non-negative, got ", n);
  TORCH_CHECK(crow.numel() == n + 1, op, ": crow_indices must have n + 1 = ", n + 1, " entries, got ", crow.numel());
  check_tensor(op, col, "col_indices", 1);
  TORCH_CHECK(col.numel() == values.numel(), op, ": col_indices has ", col.numel(), " entries but values has ",
              values.numel());
  check_tensor(op, bitmap, "bitmap", 2);
  TORCH_CHECK(bitmap.scalar_type() == at::kByte, op, ": bitmap must have dtype torch.uint8, got ",
              dtype_name(bitmap.scalar_type()));
  TORCH_CHECK(bitmap.is_contiguous(), op, ": bitmap must be contiguous");
  const int64_t K = x.size(1), bytes = (K + 63) / 64 * 8;
  TORCH_CHECK(bitmap.size(0) == n && bitmap.size(1) == bytes, op, ": bitmap must have shape [n, 8 * ceil(K / 64)] = [",
              n, ", ", bytes, "] for K = ", K, ", got ", bitmap.sizes());
  const int32_t* c = crow.const_data_ptr<int32_t>();
  TORCH_CHECK(c[0] == 0 && c[n] == values.numel(), op, ": crow_indices must start at 0 and end at nnz = ",
              values.numel(), ", got ", c[0], "..", c[n]);
}

// x [M, K] into xp [Mp][ldx] of type P (float, or bf16 bits when T is bf16 and P is uint16_t), zero-padded.
template <typename T, typename P>
at::Tensor pack_x(const T* x, int64_t M, int64_t K, int64_t Mp, int64_t ldx) {
  at::Tensor xp = at::zeros({Mp, ldx}, at::TensorOptions().dtype(std::is_same_v<P, float> ? at::kFloat : at::kShort));
  P* d = static_cast<P*>(xp.data_ptr());
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < K; ++k) {
      if constexpr (std::is_same_v<P, float>) {
        d[m * ldx + k] = static_cast<float>(x[m * K + k]);
      } else {
        std::memcpy(d + m * ldx + k, x + m * K + k, sizeof(P));
      }
    }
  }
  return xp;
}

// col_indices are read only when M > kMaxRows (then this is csr_mm); autograd saves them for the backward.
at::Tensor csr_bitmap_mm(const at::Tensor& x_in, const at::Tensor& crow, const at::Tensor& col,
                         const at::Tensor& bitmap, const at::Tensor& values, const std::optional<at::Tensor>& bias_in,
                         int64_t n) {
  constexpr const char* op = "sparsekit::csr_bitmap_mm";
  check_args(op, x_in, crow, col, bitmap, values, n);
  if (x_in.size(0) > kMaxRows) return csr_mm_cpu(x_in, crow, col, values, bias_in, n);
  const at::Tensor bias = checked_bias(op, bias_in, n, x_in, "x");
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), words = bitmap.size(1) / 8;
  const uint64_t* bm = reinterpret_cast<const uint64_t*>(bitmap.const_data_ptr<uint8_t>());
  const int32_t* c = crow.const_data_ptr<int32_t>();
  const int64_t bad = first_bad_row(bm, words, c, n, K);
  TORCH_CHECK(bad < 0, op, ": row ", bad, " of bitmap does not match crow_indices (its set bits must number ",
              "crow[r + 1] - crow[r] and lie below K = ", K, ")");
  at::Tensor y = at::empty({M, n}, x.options());
  if (M == 0 || n == 0) return y;
  const at::Tensor bias_f =
      bias.defined() && x.scalar_type() != at::kDouble ? bias.to(at::kFloat).contiguous() : at::Tensor();
  const float* bf = bias_f.defined() ? bias_f.const_data_ptr<float>() : nullptr;
  // the kernels write fp32 rows (bias added): into y itself for float32
  at::Tensor out = x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble
                       ? y : at::empty({M, n}, x.options().dtype(at::kFloat));
  const int64_t Mp = padded_rows(M), ldx = words * 64;
  const int64_t grain = grain_for(words * 64 * M);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sparsekit_csr_bitmap_mm", [&] {
    const scalar_t* xd = x.const_data_ptr<scalar_t>();
    if constexpr (std::is_same_v<scalar_t, double>) {
      const at::Tensor xp = at::zeros({M, ldx}, x.options());
      xp.narrow(1, 0, K).copy_(x);
      at::parallel_for(0, n, grain, [&](int64_t r0, int64_t r1) {
        rows_double(xp.const_data_ptr<double>(), ldx, M, bm, words, c, values.const_data_ptr<double>(),
                    bias_ptr<double>(bias), y.mutable_data_ptr<double>(), n, r0, r1);
      });
    } else {
      const bool bf16 = std::is_same_v<scalar_t, at::BFloat16>;
      // fp16 values are widened once per call (fp16 weights on a CPU are rare); bf16 stay as bits
      const at::Tensor v = std::is_same_v<scalar_t, at::Half> ? values.to(at::kFloat).contiguous() : values;
      const Isa isa = active_isa();
#if SPARSEKIT_X86
      const std::string want = requested_isa();
      const bool dot = bf16 && isa == Isa::kAvx512 && has_bf16_dot() && (want.empty() || want == "amx");
#else
      const bool dot = false;
#endif
      const at::Tensor xp = dot ? pack_x<scalar_t, uint16_t>(xd, M, K, Mp, ldx) : pack_x<scalar_t, float>(xd, M, K, Mp, ldx);
      Job j{xp.const_data_ptr(), ldx, M, bm, words, c, v.const_data_ptr(), v.numel(), bf,
            out.mutable_data_ptr<float>(), n};
      at::parallel_for(0, n, grain, [&](int64_t r0, int64_t r1) {
#if SPARSEKIT_X86
        if (dot) return tiled_rows(avx512bf16::kernels(), j, r0, r1);
        if (isa == Isa::kAvx512) {
          return tiled_rows(bf16 ? avx512::kernels<true>() : avx512::kernels<false>(), j, r0, r1);
        }
        if (isa == Isa::kAvx2) return tiled_rows(bf16 ? avx2::kernels<true>() : avx2::kernels<false>(), j, r0, r1);
#endif
        rows_portable(j, bf16, r0, r1);
      });
    }
  });
  if (!out.is_same(y)) y.copy_(out);
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekit, CPU, m) { m.impl("csr_bitmap_mm", &csr_bitmap_mm); }
