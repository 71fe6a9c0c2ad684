// Portable building blocks shared by the CPU kernels' plain (float64 / fallback) paths: packing activations
// into transposed M-tiles, choosing the M tile at run time, register-held accumulator tiles, and a dot product.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace sparsekit::cpu {

// The kernels vectorize over M: activations are packed in tiles of MT rows, transposed, in the
// accumulation type: packed[t][c][j] = src[t*MT + j][c], zero past M. Every inner loop is then an MT-wide
// contiguous axpy, whatever the block shape, and 16-bit inputs are converted once instead of per use.
template <int64_t MT, typename T, typename A>
at::Tensor pack_rows(const at::Tensor& src, int64_t M, int64_t C) {
  const int64_t tiles = (M + MT - 1) / MT;
  at::Tensor dst = at::empty({tiles, C, MT}, src.options().dtype(c10::CppTypeToScalarType<A>::value));
  const T* s = src.const_data_ptr<T>();
  A* d = dst.mutable_data_ptr<A>();
  at::parallel_for(0, tiles, grain_for(C * MT), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t j = 0; j < MT; ++j) {
        const int64_t m = t * MT + j;
        A* dt = d + t * C * MT + j;
        if (m < M) {
          for (int64_t c = 0; c < C; ++c) dt[c * MT] = static_cast<A>(s[m * C + c]);
        } else {
          for (int64_t c = 0; c < C; ++c) dt[c * MT] = A(0);
        }
      }
    }
  });
  return dst;
}

// MT = 16 lanes for real batches; 4 or 1 for tiny M, where padding to 16 would waste most of the work.
template <typename F>
void with_m_tile(int64_t M, const F& f) {
  if (M >= 16) {
    f(std::integral_constant<int64_t, 16>{});
  } else if (M >= 4) {
    f(std::integral_constant<int64_t, 4>{});
  } else {
    f(std::integral_constant<int64_t, 1>{});
  }
}

// The plain kernels' prologue, written once: src [M, C] packed (pack_rows) in the M tile with_m_tile picks, then
// f(mt, packed) with mt an integral_constant (decltype(mt)::value is MT, for the kernel's template argument).
template <typename T, typename A, typename F>
void with_packed_rows(const at::Tensor& src, int64_t M, int64_t C, const F& f) {
  with_m_tile(M, [&](auto mt) {
    const at::Tensor packed = pack_rows<decltype(mt)::value, T, A>(src, M, C);
    f(mt, packed.template const_data_ptr<A>());
  });
}

// MT accumulators held in 16-byte vectors (GCC/Clang vector extension: SSE2 on plain x86-64, NEON on
// arm64). Written as a plain loop over MT, GCC 12 sometimes vectorized the surrounding loop over stored
// weights instead and ran 4x slower; explicit vectors keep the accumulators in registers. MT is 1 or a
// multiple of the lanes (with_m_tile gives 1, 4 or 16).
template <typename A, int64_t MT>
struct Tile {
  typedef A V __attribute__((vector_size(16)));
  static constexpr int64_t kLanes = 16 / sizeof(A), kVecs = MT == 1 ? 1 : MT / kLanes;
  static_assert(MT == 1 || MT % kLanes == 0, "M tile must be 1 or a multiple of the vector lanes");
  V acc[kVecs] = {};
  A acc1 = 0;  // MT == 1

  // acc[0:MT] += w * x[0:MT]
  inline void fma(A w, const A* x) {
    if constexpr (MT == 1) {
      acc1 += w * x[0];
    } else {
      for (int64_t i = 0; i < kVecs; ++i) {
        V xv;
        std::memcpy(&xv, x + i * kLanes, sizeof(V));  // unaligned vector load
        acc[i] += w * xv;
      }
    }
  }
  inline A operator[](int64_t j) const {
    if constexpr (MT == 1) {
      return acc1;
    } else {
      return acc[j / kLanes][j % kLanes];
    }
  }
};

template <typename A>
inline A dot(const A* a, const A* b, int64_t n) {
  A s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

}  // namespace sparsekit::cpu
