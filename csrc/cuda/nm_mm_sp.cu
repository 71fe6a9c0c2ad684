// 2:4 semi-structured GEMM on the sparse tensor cores for sparsekit::nm_mm (fp16/bf16, fp32 accumulation),
// reached through nm_mm.cu's nm_mm_cuda (one registered kernel) once the SPARSEKIT_NM_SP first-use self-check
// (selfcheck.cuh) passed; see nm_mm_sp.cuh for when it applies.
//
// y^T = W @ x^T: the sparse W [N, K] is mma.sp's A operand (16 rows of N per warp, reduction along K) and x^T
// is B, so the rows of x become the mma's n = 8 dimension. mma.sp(::ordered_metadata).sync.aligned.m16n8k32.
// row.col.f32.{f16,bf16}.{f16,bf16}.f32, one thread block = 4 warps = 64 rows of W x BM = 8 * NT rows of x;
// per stage BK of K (BK = 256 / 128 / 128 / 64 for NT = 1 / 2 / 4 / 8: more K per stage when M is small, so
// that enough bytes of W are in flight). The next stage's global loads are issued into registers before the
// current stage is multiplied (register double buffering), then stored to shared memory.
//
// Operand layouts (PTX ISA 9.7.14.6.2.2, "Matrix Fragments for sparse mma.m16n8k32 with .f16 and .bf16"),
// g = lane / 4, t = lane % 4, for one k-step of 32 (dense) columns:
//   A (compressed 16 x 16): reg0 = row g, the 2 kept values of group t (dense columns 4t..4t+3),
//       reg1 = row g+8, group t; reg2 = row g, group t+4 (dense 16+4t..); reg3 = row g+8, group t+4.
//       Our values [N, K/2] keep the two values of group j at columns 2j, 2j+1, lower position first: that IS
//       the compressed layout, so each register is one 32-bit load of values (no shuffling).
//   B (32 x 8, "col"): reg j = (k = 2t + 8j, 2t + 8j + 1; n = g) = two consecutive K entries of x row g.
//   C/D: c0, c1 = (row g, cols 2t, 2t+1); c2, c3 = (row g+8, cols 2t, 2t+1), row = W row, col = x row.
//   Metadata e (Figure 122 "Sparse MMA .m16n8k32 metadata layout for .f16/.bf16"), sparsity selector 0: the
//       threads with t in {0, 1} supply it: bits 0..15 = row g, bits 16..31 = row g+8, each for the 16 dense
//       columns 16*(t & 1) .. 16*(t & 1)+15 of the k-step, i.e. 4 groups; group j of those 16 columns is the
//       nibble at bits 4j..4j+3 = (first kept position) | (second kept position) << 2 (0b0100 = positions 0,1).
//       Every lane computes its word from t & 1, so lanes 2, 3 hold copies (any selector would do).
//   Sources for the metadata layout, all agreeing: the PTX ISA text and figure above; the MLIR integration test
//   sparse-mma-2-4-f16.mlir (16x2xi16 metadata, thread -> (row lane/4 and lane/4 + 8, column lane % 2), lower
//   row in the low half); OpenXLA/Triton's SparseLocalLoadToLLVM (same thread map, upper row << 16); PyTorch's
//   two_four_create_meta_kernel (nibble codes 0b0100 .. 0b1110, lower group in the lower bits). Our own code.
//
// Metadata re-encoding: on the fly, while staging a tile, not in a pre-pass. The 16 uint8 positions of one W row
// and one k-step (8 groups) arrive as one 16-byte load and become one 32-bit word (8 nibbles, ~12 integer ops)
// in shared memory; at the mma each lane picks its two 16-bit halves with one PRMT. A pre-pass kernel per call
// would read the same N*K/2 bytes of positions, write N*K/8 bytes of packed metadata and read them back: more
// traffic plus a launch. The cost that remains is the uint8 positions themselves: N*K/2 bytes per call against
// N*K bytes of fp16/bf16 values (a packed 2-bit metadata tensor kept with the weight would cut it to N*K/8).
// Positions must be strictly increasing inside a group (NM.validate checks it), as mma.sp::ordered_metadata
// (PTX ISA 8.5, CUDA >= 12.5; plain mma.sp before) requires; padded groups (K tail, rows >= N) get
// positions (0, 1) with zero values.
#include "mma.cuh"
#include "nm_mm_sp.cuh"

#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <climits>
#include <cstdint>
#include <type_traits>

#if defined(__CUDACC_VER_MAJOR__) && (__CUDACC_VER_MAJOR__ > 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 5))
#define SPARSEKIT_MMA_SP "mma.sp::ordered_metadata"  // the documented fast form (plain mma.sp may be slower)
#else
#define SPARSEKIT_MMA_SP "mma.sp"
#endif

namespace {

constexpr int kThreads = 128;  // 4 warps
constexpr int kBN = 64;        // rows of W per thread block: 16 per warp

// Which operands may use 16-byte loads (pointer 16-byte aligned and rows a multiple of 16 bytes).
enum : int { kVecX = 1, kVecValues = 2, kVecIndices = 4 };

// Reduction (dense K) per stage for NT n-tiles of 8 rows of x.
template <int NT>
struct StageK;
template <>
struct StageK<1> { static constexpr int value = 256; };
template <>
struct StageK<2> { static constexpr int value = 128; };
template <>
struct StageK<4> { static constexpr int value = 128; };
template <>
struct StageK<8> { static constexpr int value = 64; };

template <int NT>
struct Tile {
  static constexpr int BM = 8 * NT;             // rows of x per thread block
  static constexpr int BK = StageK<NT>::value;  // dense K per stage
  static constexpr int KS = BK / 32;            // mma k-steps per stage
  // Shared-memory leading dimensions, in elements. Padded so that the fragment loads are bank-conflict free:
  // A row stride 20 or 36 or 68 words, B row stride 36 or 68 or 132 words (both 4 or 20 mod 32), metadata
  // row stride KS + 1 (odd).
  static constexpr int ALD = BK / 2 + 8;
  static constexpr int BLD = BK + 8;
  static constexpr int ELD = KS + 1;
  // 16-byte chunks per stage and per thread: values (8 per chunk), positions (16 = one k-step), x (8).
  static constexpr int kValChunks = kBN * BK / 16, kIdxChunks = kBN * KS, kXChunks = BM * BK / 8;
  static constexpr int kValPer = kValChunks / kThreads, kIdxPer = kIdxChunks / kThreads;
  static constexpr int kXPer = kXChunks / kThreads;
  static_assert(kValPer * kThreads == kValChunks && kIdxPer * kThreads == kIdxChunks &&
                    kXPer * kThreads == kXChunks && kValPer > 0 && kIdxPer > 0 && kXPer > 0,
                "stage chunks must divide among the threads");
};

using sparsekit_cuda::ld32;

// 8 consecutive 16-bit elements from p, of which `avail` (> 0) exist; zeros past them. kVecOnly: the caller
// guarantees 16-byte alignment and avail >= 8 (every operand vectorisable, so a chunk is all in or all out).
template <bool kVecOnly>
__device__ __forceinline__ uint4 load8(const uint16_t* __restrict__ p, int64_t avail, bool vec) {
  if constexpr (kVecOnly) {
    return __ldg(reinterpret_cast<const uint4*>(p));
  } else {
    if (vec && avail >= 8) return __ldg(reinterpret_cast<const uint4*>(p));
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t lo = 2 * i < avail ? static_cast<uint32_t>(p[2 * i]) : 0u;
      const uint32_t hi = 2 * i + 1 < avail ? static_cast<uint32_t>(p[2 * i + 1]) : 0u;
      w[i] = lo | (hi << 16);
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
}

// Positions (0, 1) for every pair: the padding of groups outside W (their values are zero).
constexpr uint32_t kPadPositions = 0x01000100u;

// The 16 positions of one k-step of one W row, of which `avail` (> 0, even) exist; padding past them.
template <bool kVecOnly>
__device__ __forceinline__ uint4 load16_positions(const uint8_t* __restrict__ p, int64_t avail, bool vec) {
  if constexpr (kVecOnly) {
    return __ldg(reinterpret_cast<const uint4*>(p));
  } else {
    if (vec && avail >= 16) return __ldg(reinterpret_cast<const uint4*>(p));
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      uint32_t word = 0;
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const int j = 4 * i + b;
        const uint32_t v = j < avail ? static_cast<uint32_t>(p[j]) : static_cast<uint32_t>(j & 1);
        word |= v << (8 * b);
      }
      w[i] = word;
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
}

// 16 positions (bytes, each 0..3, pairs (first, second) of 8 groups) -> 8 metadata nibbles, group j at bits
// 4j..4j+3 = first | second << 2. In a word of 4 position bytes b0..b3 (groups j, j+1), w | (w >> 6) puts
// b0 | b1 << 2 at bits 0..3 and b2 | b3 << 2 at bits 16..19.
__device__ __forceinline__ uint32_t pack_metadata(const uint4& pos) {
  auto two_groups = [](uint32_t w) {
    const uint32_t p = w | (w >> 6);
    return (p & 0xFu) | ((p >> 12) & 0xF0u);
  };
  return two_groups(pos.x) | (two_groups(pos.y) << 8) | (two_groups(pos.z) << 16) | (two_groups(pos.w) << 24);
}

template <typename T>
__device__ __forceinline__ void mma_sp_16832(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[4],
                                             uint32_t e) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, c10::Half>) {
    asm volatile(SPARSEKIT_MMA_SP
                 ".sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                 "{%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, 0x0;\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]),
                   "r"(e));
  } else {
    asm volatile(SPARSEKIT_MMA_SP
                 ".sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                 "{%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, 0x0;\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]),
                   "r"(e));
  }
#else
  __trap();  // the host side only launches on compute capability >= 8.0
#endif
}

// x [M, K], values / indices [N, K/2], y [M, N], all row-major; fp16/bf16 handled as raw 16-bit words until
// the mma. Thread block b: W rows n0 = (b / mtiles) * 64 .., x rows m0 = (b % mtiles) * BM .. (the blocks that
// share a W tile are adjacent, so W is read from DRAM about once). kVec: every operand may use 16-byte loads
// (the common case, compiled without the element-load fallback); otherwise `vec` says which may.
template <typename T, int NT, bool kVec>
__global__ void __launch_bounds__(kThreads)
nm24_sp_kernel(const uint16_t* __restrict__ x, const uint16_t* __restrict__ values,
               const uint8_t* __restrict__ indices, const T* __restrict__ bias, T* __restrict__ y, int64_t M,
               int64_t N, int64_t K, int64_t mtiles, int vec) {
  using C = Tile<NT>;
  constexpr int BM = C::BM, BK = C::BK, KS = C::KS, ALD = C::ALD, BLD = C::BLD, ELD = C::ELD;
  __shared__ __align__(16) uint16_t as[kBN * ALD];  // compressed W tile: 64 rows x BK/2 values
  __shared__ __align__(16) uint16_t bs[BM * BLD];   // x tile: BM rows x BK
  __shared__ uint32_t es[kBN * ELD];                // metadata: 64 rows x KS words

  const int64_t kept = K / 2;
  const int64_t n0 = (blockIdx.x / mtiles) * kBN, m0 = (blockIdx.x % mtiles) * BM;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const bool vec_x = (vec & kVecX) != 0, vec_v = (vec & kVecValues) != 0, vec_i = (vec & kVecIndices) != 0;

  // Each thread's chunks of a stage: the same column offset in rows r0, r0 + step, ... (the chunks per row
  // divide the thread count), so one base pointer per operand serves every stage.
  constexpr int kValPerRow = BK / 16, kXPerRow = BK / 8;
  constexpr int kValStep = kThreads / kValPerRow, kIdxStep = kThreads / KS, kXStep = kThreads / kXPerRow;
  static_assert(kValStep * kValPerRow == kThreads && kIdxStep * KS == kThreads && kXStep * kXPerRow == kThreads,
                "chunks per row must divide the thread count");
  const int v_r0 = tid / kValPerRow, v_col = 8 * (tid % kValPerRow);
  const int i_r0 = tid / KS, i_col = 16 * (tid % KS);
  const int x_r0 = tid / kXPerRow, x_col = 8 * (tid % kXPerRow);
  const uint16_t* const v_base = values + (n0 + v_r0) * kept + v_col;
  const uint8_t* const i_base = indices + (n0 + i_r0) * kept + i_col;
  const uint16_t* const x_base = x + (m0 + x_r0) * K + x_col;

  uint4 rv[C::kValPer], ri[C::kIdxPer], rx[C::kXPer];
  // Global -> registers for the stage starting at dense column k0 (all loads independent, issued together).
  auto load_stage = [&](int64_t k0) {
    const int64_t vcol = k0 / 2 + v_col, icol = k0 / 2 + i_col, xcol = k0 + x_col;
#pragma unroll
    for (int i = 0; i < C::kValPer; ++i) {
      rv[i] = (n0 + v_r0 + i * kValStep < N && vcol < kept)
                  ? load8<kVec>(v_base + (i * kValStep) * kept + k0 / 2, kept - vcol, vec_v)
                  : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int i = 0; i < C::kIdxPer; ++i) {
      ri[i] = (n0 + i_r0 + i * kIdxStep < N && icol < kept)
                  ? load16_positions<kVec>(i_base + (i * kIdxStep) * kept + k0 / 2, kept - icol, vec_i)
                  : make_uint4(kPadPositions, kPadPositions, kPadPositions, kPadPositions);
    }
#pragma unroll
    for (int i = 0; i < C::kXPer; ++i) {
      rx[i] = (m0 + x_r0 + i * kXStep < M && xcol < K)
                  ? load8<kVec>(x_base + (i * kXStep) * K + k0, K - xcol, vec_x)
                  : make_uint4(0, 0, 0, 0);
    }
  };
  // Registers -> shared memory; the positions are re-encoded into mma.sp metadata here.
  auto store_stage = [&]() {
#pragma unroll
    for (int i = 0; i < C::kValPer; ++i) {
      *reinterpret_cast<uint4*>(as + (v_r0 + i * kValStep) * ALD + v_col) = rv[i];
    }
#pragma unroll
    for (int i = 0; i < C::kIdxPer; ++i) es[(i_r0 + i * kIdxStep) * ELD + i_col / 16] = pack_metadata(ri[i]);
#pragma unroll
    for (int i = 0; i < C::kXPer; ++i) *reinterpret_cast<uint4*>(bs + (x_r0 + i * kXStep) * BLD + x_col) = rx[i];
  };

  float acc[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;

  // Warp-uniform: does this warp own any row of W, and how many n-tiles hold rows of x (block-uniform)?
  const bool warp_active = n0 + warp * 16 < N;
  const int nt_active = static_cast<int>((M - m0 + 7) / 8 < NT ? (M - m0 + 7) / 8 : NT);
  const int ra = warp * 16 + g;  // this lane's A row (and ra + 8) inside the tile
  const uint32_t half_sel = (lane & 1) ? 0x7632u : 0x5410u;  // dense columns 16..31 or 0..15 of the k-step

  const int64_t ktiles = (K + BK - 1) / BK;
  load_stage(0);
  store_stage();
  __syncthreads();
  for (int64_t kt = 0; kt < ktiles; ++kt) {
    const bool more = kt + 1 < ktiles;
    if (more) load_stage((kt + 1) * BK);
    if (warp_active) {
#pragma unroll
      for (int s = 0; s < KS; ++s) {
        const uint16_t* ap = as + ra * ALD + 16 * s + 2 * t;
        const uint32_t a[4] = {ld32(ap), ld32(ap + 8 * ALD), ld32(ap + 8),
                               ld32(ap + 8 * ALD + 8)};
        const uint32_t e = __byte_perm(es[ra * ELD + s], es[(ra + 8) * ELD + s], half_sel);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          if (nt < nt_active) {
            const uint16_t* bp = bs + (nt * 8 + g) * BLD + 32 * s + 2 * t;
            const uint32_t b[4] = {ld32(bp), ld32(bp + 8), ld32(bp + 16),
                                   ld32(bp + 24)};
            mma_sp_16832<T>(acc[nt], a, b, e);
          }
        }
      }
    }
    __syncthreads();
    if (more) {
      store_stage();
      __syncthreads();
    }
  }

  if (!warp_active) return;
#pragma unroll
  for (int h = 0; h < 2; ++h) {  // h = 0: W row g, h = 1: W row g + 8
    const int64_t n = n0 + ra + 8 * h;
    if (n >= N) continue;
    const float bv = bias != nullptr ? static_cast<float>(bias[n]) : 0.f;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int64_t m = m0 + nt * 8 + 2 * t + j;
        if (m < M) y[m * N + n] = static_cast<T>(acc[nt][2 * h + j] + bv);
      }
    }
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T, int NT>
void launch(const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices, const at::Tensor& bias,
            at::Tensor& y, int64_t blocks, int64_t mtiles, int vec, cudaStream_t stream) {
  auto kernel = vec == (kVecX | kVecValues | kVecIndices) ? nm24_sp_kernel<T, NT, true> : nm24_sp_kernel<T, NT, false>;
  kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<const uint16_t*>(x.const_data_ptr()), static_cast<const uint16_t*>(values.const_data_ptr()),
      indices.const_data_ptr<uint8_t>(), bias.defined() ? bias.const_data_ptr<T>() : nullptr,
      y.mutable_data_ptr<T>(), x.size(0), values.size(0), x.size(1), mtiles, vec);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_for_m(const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices, const at::Tensor& bias,
                  at::Tensor& y, int nt, int64_t ntiles, int vec, cudaStream_t stream) {
  const int64_t mtiles = (x.size(0) + 8 * nt - 1) / (8 * nt);
  const int64_t blocks = ntiles * mtiles;
  if (nt == 1) launch<T, 1>(x, values, indices, bias, y, blocks, mtiles, vec, stream);
  else if (nt == 2) launch<T, 2>(x, values, indices, bias, y, blocks, mtiles, vec, stream);
  else if (nt == 4) launch<T, 4>(x, values, indices, bias, y, blocks, mtiles, vec, stream);
  else launch<T, 8>(x, values, indices, bias, y, blocks, mtiles, vec, stream);
}

}  // namespace

namespace sparsekit_cuda {

bool nm_mm_sparse_tensor_core(const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices,
                              const at::Tensor& bias, at::Tensor& y, int64_t n, int64_t m, cudaStream_t stream) {
  if (n != 2 || m != 4) return false;
  const auto dtype = x.scalar_type();
  if (dtype != at::kHalf && dtype != at::kBFloat16) return false;
  const int64_t M = x.size(0), K = x.size(1), N = values.size(0);
  if (K % 4 != 0 || values.size(1) != K / 2 || indices.size(1) != K / 2) return false;
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, x.get_device()));
  if (major < 8) return false;
  // n-tiles of 8 rows of x per warp: the smallest of 1, 2, 4, 8 that covers M, else 8 (64 rows per block)
  const int nt = M <= 8 ? 1 : M <= 16 ? 2 : M <= 32 ? 4 : 8;
  const int64_t ntiles = (N + kBN - 1) / kBN, mtiles = (M + 8 * nt - 1) / (8 * nt);
  if (ntiles > INT_MAX || mtiles > INT_MAX || ntiles * mtiles > INT_MAX) return false;
  if (M == 0 || N == 0) return true;  // nothing to compute; y is [M, N] with M or N zero
  int vec = 0;
  if (aligned16(x.const_data_ptr()) && K % 8 == 0) vec |= kVecX;              // x rows: K * 2 bytes
  if (aligned16(values.const_data_ptr()) && K % 16 == 0) vec |= kVecValues;   // W rows: K / 2 * 2 bytes
  if (aligned16(indices.const_data_ptr()) && K % 32 == 0) vec |= kVecIndices; // W rows: K / 2 bytes
  if (dtype == at::kHalf) launch_for_m<c10::Half>(x, values, indices, bias, y, nt, ntiles, vec, stream);
  else launch_for_m<c10::BFloat16>(x, values, indices, bias, y, nt, ntiles, vec, stream);
  return true;
}

}  // namespace sparsekit_cuda
