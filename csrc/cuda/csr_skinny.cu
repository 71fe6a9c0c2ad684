// Skinny CSR x dense product on the tensor cores for sparsekit::csr_mm (fp16/bf16, M <= 64: LLM decode), after
// Flash-LLM's "load as sparse, compute as dense" (Xia et al., VLDB 2024), reached through csr_spmm.cu's
// csr_mm_cuda; csr_skinny.cuh says when it applies.
//
// y = x @ W^T + bias is computed as y^T = W @ x^T, so the rows of W fill the 16-row side of mma.sync.m16n8k16
// and the few rows of x its 8-wide side (M padded to 8, 16, 32 or 64: NT = 1, 2, 4 or 8 n-tiles).
//   - Thread block: 4 warps, 64 rows of W (16 per warp), all M rows of x, and a range of K (split-K: the
//     chunks of K are cut into grid.y ranges when N / 64 row blocks alone would leave SMs idle; each split
//     writes fp32 partial sums to a workspace [splits, M, N] that a second kernel adds up in split order plus
//     the bias: deterministic, no atomics. With one split the bias is added and y written directly).
//   - K is walked in chunks of 64 columns. x's chunk [M, 64] is staged in shared memory with 16-byte cp.async
//     (zero-filled past K; plain loads when K % 8 != 0 or x is not 16-byte aligned), double-buffered: the next
//     chunk is in flight while this one is multiplied. One __syncthreads per chunk.
//   - Each warp owns a private dense 16 x 64 tile of W in shared memory: zero-filled (16-byte stores), then the
//     nonzeros of its 16 rows that fall in the chunk are scattered into it. CSR keeps every row's columns
//     sorted (sparsekit.formats.CSR checks it), so each row keeps a cursor to its first entry not yet used; a
//     "round" reads a window of 32 entries past the cursor of each of the 16 rows (lane i reads entry
//     cursor + i: one coalesced load of values and one of column indices per row), scatters those with a
//     column inside the chunk and advances the cursor by their count (a ballot). Only rows whose whole window
//     was inside the chunk need another round (density > 0.5 or clusters). The first round of the next chunk
//     is loaded into registers before this chunk's mma (Flash-LLM's overlap of global loads with the tensor
//     cores); the scatter after it. A row's 64-column span of the tile is 128 contiguous bytes, so the 32
//     lanes' scattered stores never share a bank.
//   - Split-K ranges start mid-row: the cursor of each row is found by a 32-ary search (all lanes probe 32
//     evenly spaced entries of the remaining interval of each of the 16 rows at once, a ballot narrows it by
//     32x), 2 rounds for rows up to ~1000 entries, 3 up to ~32000.
//   - Products: per chunk 4 k-steps x NT mma.sync (row.col, fp32 accumulators), fragments read with 32-bit
//     shared loads from rows padded to 72 elements (144 bytes: conflict free). Fragment layout (PTX ISA,
//     m16n8k16 .f16/.bf16), g = lane / 4, t = lane % 4, A = the W tile [n][k], B = x^T held as x [m][k]:
//       A regs a0..a3: (row g, k 2t..2t+1), (row g+8, k 2t..), (row g, k 2t+8..), (row g+8, k 2t+8..)
//       B regs b0, b1: (k 2t..2t+1, col g), (k 2t+8..2t+9, col g)
//       C regs c0..c3: (row g, col 2t), (row g, col 2t+1), (row g+8, col 2t), (row g+8, col 2t+1)
//     so C[i][j] is y[m = nt * 8 + j][n = row0 + i].
// Differences from Flash-LLM: no offline Tiled-CSL re-encoding (the op takes plain CSR and its schema has no
// place to cache one), so tiles are cut out of CSR rows on the fly with cursors, and windows read some entries
// twice (L1 hits); the W tile is warp-private (no block barrier between scatter and mma).
//
// Index data is trusted (sorted, strictly increasing columns within a row, as sparsekit.formats.CSR
// guarantees); unsorted columns would give wrong sums but never write outside the tile. Because no GPU has
// validated the fragment and pipeline code yet, the path runs only after the first-use self-check
// (selfcheck.cuh) agreed with the generic kernel on this device.
#include "mma.cuh"
#include "csr_skinny.cuh"

#include <ATen/Dispatch.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "selfcheck.cuh"

namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRowsPerWarp = 16;                   // the mma's M side
constexpr int kRowsPerBlock = kWarps * kRowsPerWarp;
constexpr int kChunk = 64;                         // K columns per step (4 mma k-steps)
constexpr int kLd = kChunk + 8;                    // shared row stride in elements (144 bytes)
constexpr int kWin = 32;                           // entries of a row read per round (one per lane)
constexpr int kMaxM = 64;
// Density window of the automatic rule (SPARSEKIT_CSR_SKINNY unset or "1"; csr_skinny.cuh), first guesses
// around Flash-LLM's 60-90% sparsity target, untuned: they serve only where the dispatcher does not measure
// (sparsekit.ops._dispatch times this path, the row-dot and the tiled kernels per shape through
// sparsekit::csr_mm_variant and keeps the fastest, SkinnyRule::kMeasured then skips the window):
//   below ~9% the work per 16 x 64 tile that does not shrink with the nonzeros (zero fill, one 32-entry window
//   per row, the mma on a mostly-zero tile, the x chunk) outweighs the nnz-proportional generic kernels;
//   above 50% a CSR weight (2-byte value + 2-byte column per nonzero) moves as many bytes as the dense one,
//   and rows need a second window per chunk.
constexpr double kMinDensity = 0.09;
constexpr double kMaxDensity = 0.5;
// Split-K: aim for this many thread blocks per SM, but keep at least this many chunks per split.
constexpr int kSplitBlocksPerSm = 6;
constexpr int kMinChunksPerSplit = 4;
constexpr int kMinBlocksPerSm = 4;                 // register cap (<= 128 per thread) so 4 blocks fit an SM
constexpr const char* kEnv = "SPARSEKIT_CSR_SKINNY";

// ------------------------------------------------------------------------------------------ device helpers
using sparsekit_cuda::ld32;
using sparsekit_cuda::mma_16816;

// 16 bytes global -> shared, asynchronous; zero-filled when !full (src is then not read).
__device__ __forceinline__ void cp_async16(uint16_t* smem, const uint16_t* gmem, bool full) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(full ? 16 : 0)
               : "memory");
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void cp_async_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

// x[:, k0 : k0 + kChunk] -> dst [M][kLd] (columns >= K zero); vec: 16-byte cp.async (K % 8 == 0, x aligned).
__device__ __forceinline__ void load_x_chunk(uint16_t* dst, const uint16_t* __restrict__ x, int M, int K, int k0,
                                             bool vec, int tid) {
  if (vec) {
    for (int i = tid; i < M * (kChunk / 8); i += kThreads) {
      const int m = i / (kChunk / 8), q = (i % (kChunk / 8)) * 8, k = k0 + q;
      const bool in = k < K;
      cp_async16(dst + m * kLd + q, in ? x + static_cast<int64_t>(m) * K + k : x, in);
    }
    cp_async_commit();
  } else {
    for (int i = tid; i < M * kChunk; i += kThreads) {
      const int m = i / kChunk, q = i % kChunk, k = k0 + q;
      dst[m * kLd + q] = k < K ? x[static_cast<int64_t>(m) * K + k] : uint16_t(0);
    }
  }
}

// Window loads of one round: for each row r in `rows`, lane i reads entry cur[r] + i (when inside the row)
// into pc[r] (its column; INT_MAX when there is none) and pv[r] (its value's bits).
template <typename I>
__device__ __forceinline__ void fetch_round(const I* __restrict__ col, const uint16_t* __restrict__ val,
                                            const int (&cur)[kRowsPerWarp], const int (&end)[kRowsPerWarp],
                                            uint32_t rows, int lane, int (&pc)[kRowsPerWarp],
                                            uint16_t (&pv)[kRowsPerWarp]) {
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int e = cur[r] + lane;
    if (((rows >> r) & 1u) && e < end[r]) {
      pc[r] = static_cast<int>(col[e]);
      pv[r] = val[e];
    } else {
      pc[r] = INT_MAX;
      pv[r] = 0;
    }
  }
}

// Scatter the fetched entries with a column in [c0, c0 + kChunk) into the tile, advance the cursors past them
// (columns are sorted, so they are a prefix of each window). Returns the rows whose whole window was inside
// the chunk: they may have more entries in it.
__device__ __forceinline__ uint32_t scatter_round(uint16_t* tile, const int (&pc)[kRowsPerWarp],
                                                  const uint16_t (&pv)[kRowsPerWarp], int c0,
                                                  int (&cur)[kRowsPerWarp]) {
  uint32_t full = 0;
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const unsigned rel = static_cast<unsigned>(pc[r] - c0);  // pc >= 0 real column or INT_MAX; c0 >= 0
    const bool in = rel < static_cast<unsigned>(kChunk);
    if (in) tile[r * kLd + rel] = pv[r];
    const int n = __popc(__ballot_sync(0xffffffffu, in));
    cur[r] += n;
    if (n == kWin) full |= 1u << r;
  }
  return full;
}

// Expand chunk [c0, c0 + kChunk) of the warp's 16 rows into its (already zeroed) tile, starting from the
// round already fetched into pc/pv; further rounds for rows that need them.
template <typename I>
__device__ __forceinline__ void expand_chunk(uint16_t* tile, const I* __restrict__ col,
                                             const uint16_t* __restrict__ val, int c0, int (&cur)[kRowsPerWarp],
                                             const int (&end)[kRowsPerWarp], int lane, int (&pc)[kRowsPerWarp],
                                             uint16_t (&pv)[kRowsPerWarp]) {
  uint32_t more = scatter_round(tile, pc, pv, c0, cur);
  while (more != 0) {  // warp-uniform
    fetch_round(col, val, cur, end, more, lane, pc, pv);
    more = scatter_round(tile, pc, pv, c0, cur);
  }
}

// cur[r] <- the first entry in [cur[r], end[r]) with column >= kb (end[r] when none): a 32-ary search, all 16
// rows at once. Invariant: entries in [start, cur) have columns < kb, entries in [hi, end) columns >= kb.
template <typename I>
__device__ __forceinline__ void seek_rows(const I* __restrict__ col, int (&cur)[kRowsPerWarp],
                                          const int (&end)[kRowsPerWarp], int kb, int lane) {
  int hi[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) hi[r] = end[r];
  while (true) {
    int pc[kRowsPerWarp];
    bool busy = false;
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {  // all probes first: 16 independent loads per lane
      const int len = hi[r] - cur[r];
      const int step = (len + kWin - 1) / kWin;
      const int q = cur[r] + (lane + 1) * step - 1;
      pc[r] = (len > 0 && q < hi[r]) ? static_cast<int>(col[q]) : INT_MAX;
      busy |= len > 0;
    }
    if (!busy) break;  // warp-uniform: cur and hi are the same in every lane
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int len = hi[r] - cur[r];
      if (len > 0) {
        const int step = (len + kWin - 1) / kWin;
        const int c = __popc(__ballot_sync(0xffffffffu, pc[r] < kb));  // probes below kb: a prefix
        hi[r] = min(hi[r], cur[r] + (c + 1) * step - 1);
        cur[r] += c * step;
      }
    }
  }
}

__device__ __forceinline__ void zero_tile(uint16_t* tile, int lane) {
#pragma unroll
  for (int i = lane; i < kRowsPerWarp * (kChunk / 8); i += 32) {
    *reinterpret_cast<uint4*>(tile + (i / (kChunk / 8)) * kLd + (i % (kChunk / 8)) * 8) = make_uint4(0, 0, 0, 0);
  }
}

// ------------------------------------------------------------------------------------------------ kernels
// grid (ceil(N / 64), splits); split s covers chunks [s * cps, min((s + 1) * cps, ceil(K / 64))).
// partial == nullptr: y [M, N] = acc + bias; else partial [splits, M, N] = acc (fp32).
template <typename T, typename I, int NT>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
csr_skinny_kernel(const uint16_t* __restrict__ x, const int32_t* __restrict__ crow, const I* __restrict__ col,
                  const uint16_t* __restrict__ val, const T* __restrict__ bias, T* __restrict__ y,
                  float* __restrict__ partial, int M, int N, int K, int cps, bool x_vec) {
  constexpr int MP = NT * 8;
  __shared__ __align__(16) uint16_t xs[2][MP * kLd];
  __shared__ __align__(16) uint16_t wtiles[kWarps][kRowsPerWarp * kLd];

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  uint16_t* tile = wtiles[warp];
  const int row0 = blockIdx.x * kRowsPerBlock + warp * kRowsPerWarp;
  const int nchunks = (K + kChunk - 1) / kChunk;
  const int c_begin = blockIdx.y * cps;
  const int c_end = min(nchunks, c_begin + cps);

  // rows M..MP-1 of both x buffers stay zero (their outputs are dropped; zero keeps them finite)
  for (int i = M * kLd + tid; i < MP * kLd; i += kThreads) xs[0][i] = xs[1][i] = 0;
  load_x_chunk(xs[0], x, M, K, c_begin * kChunk, x_vec, tid);

  int cur[kRowsPerWarp], end[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int n = row0 + r;
    cur[r] = n < N ? crow[n] : 0;
    end[r] = n < N ? crow[n + 1] : 0;
  }
  if (c_begin > 0) seek_rows(col, cur, end, c_begin * kChunk, lane);

  int pc[kRowsPerWarp];
  uint16_t pv[kRowsPerWarp];
  fetch_round(col, val, cur, end, 0xffffffffu, lane, pc, pv);
  zero_tile(tile, lane);
  __syncwarp();
  expand_chunk(tile, col, val, c_begin * kChunk, cur, end, lane, pc, pv);

  float acc[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;

  for (int c = c_begin; c < c_end; ++c) {  // block-uniform trip count
    const int buf = (c - c_begin) & 1;
    cp_async_wait_all();
    __syncthreads();  // x chunk c visible; every warp is done with buffer buf ^ 1 (chunk c - 1)
    const bool next = c + 1 < c_end;
    if (next) {
      fetch_round(col, val, cur, end, 0xffffffffu, lane, pc, pv);  // in flight during the mma below
      load_x_chunk(xs[buf ^ 1], x, M, K, (c + 1) * kChunk, x_vec, tid);
    }
    __syncwarp();  // the tile's scattered entries are visible to the whole warp
    const uint16_t* xb = xs[buf];
#pragma unroll
    for (int kk = 0; kk < kChunk; kk += 16) {
      const uint16_t* wa = tile + g * kLd + kk + 2 * t;
      const uint32_t a[4] = {ld32(wa), ld32(wa + 8 * kLd), ld32(wa + 8), ld32(wa + 8 * kLd + 8)};
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        if (nt * 8 < M) {  // uniform: n-tiles wholly past M are skipped
          const uint16_t* xp = xb + (nt * 8 + g) * kLd + kk + 2 * t;
          mma_16816<T>(acc[nt], a, ld32(xp), ld32(xp + 8));
        }
      }
    }
    if (next) {
      __syncwarp();  // every lane's fragment reads of the tile are done
      zero_tile(tile, lane);
      __syncwarp();
      expand_chunk(tile, col, val, (c + 1) * kChunk, cur, end, lane, pc, pv);
    }
  }

#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // h = 0: row g, h = 1: row g + 8
      const int n = row0 + g + 8 * h;
      if (n >= N) continue;
      const float b = (partial == nullptr && bias != nullptr) ? static_cast<float>(bias[n]) : 0.f;
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int m = nt * 8 + 2 * t + j;
        if (m >= M) continue;
        const float v = acc[nt][2 * h + j];
        if (partial != nullptr) {
          partial[(static_cast<int64_t>(blockIdx.y) * M + m) * N + n] = v;
        } else {
          y[static_cast<int64_t>(m) * N + n] = static_cast<T>(v + b);
        }
      }
    }
  }
}

// y[i] = sum over splits (in order) of partial[s][i] + bias[i % N], i < M * N.
template <typename T>
__global__ void csr_skinny_reduce_kernel(const float* __restrict__ partial, const T* __restrict__ bias,
                                         T* __restrict__ y, int64_t mn, int N, int splits) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= mn) return;
  float s = 0.f;
  for (int p = 0; p < splits; ++p) s += partial[p * mn + i];
  if (bias != nullptr) s += static_cast<float>(bias[i % N]);
  y[i] = static_cast<T>(s);
}

// ------------------------------------------------------------------------------------------------- host side
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

int device_attr(cudaDeviceAttr attr, int device) {
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, attr, device));
  return v;
}

// Hard requirements of the kernel (independent of the density heuristic).
bool can_run(const at::Tensor& x, const at::Tensor& values, int64_t n) {
  const auto dtype = x.scalar_type();
  if (dtype != at::kHalf && dtype != at::kBFloat16) return false;
  const int64_t M = x.size(0), K = x.size(1), nnz = values.numel();
  if (M < 1 || M > kMaxM || n < 1 || K < 1) return false;
  // 32-bit positions in the kernel: cursors + 32 lanes, row indices + 64, columns + chunk
  if (n > INT_MAX - 2 * kRowsPerBlock || K > INT_MAX - 2 * kChunk || nnz > INT_MAX - 2 * kWin) return false;
  if (ceil_div(n, kRowsPerBlock) > INT_MAX) return false;
  return device_attr(cudaDevAttrComputeCapabilityMajor, x.get_device()) >= 8;
}

// Splits of K: enough thread blocks to fill the SMs kSplitBlocksPerSm times over, each split >= kMinChunksPerSplit
// chunks (when K has that many). requested > 0 (the probe) forces a count. Returns (splits, chunks per split).
std::pair<int64_t, int64_t> plan_splits(int64_t N, int64_t K, int device, int64_t requested) {
  const int64_t nchunks = ceil_div(K, kChunk), row_blocks = ceil_div(N, kRowsPerBlock);
  int64_t splits = requested;
  if (splits <= 0) {
    const int64_t want = int64_t(device_attr(cudaDevAttrMultiProcessorCount, device)) * kSplitBlocksPerSm;
    splits = std::min(ceil_div(want, row_blocks), std::max<int64_t>(1, nchunks / kMinChunksPerSplit));
  }
  splits = std::max<int64_t>(1, std::min<int64_t>({splits, nchunks, 65535}));
  const int64_t cps = ceil_div(nchunks, splits);
  return {ceil_div(nchunks, cps), cps};
}

template <typename T, typename I, int NT>
void launch_typed(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                  const at::Tensor& bias, at::Tensor& y, int64_t splits, int64_t cps, cudaStream_t stream) {
  const int64_t M = x.size(0), K = x.size(1), N = y.size(1);
  const bool x_vec = K % 8 == 0 && aligned16(x.const_data_ptr());
  at::Tensor partial;
  if (splits > 1) partial = at::empty({splits, M, N}, x.options().dtype(at::kFloat));
  const dim3 grid(static_cast<unsigned>(ceil_div(N, kRowsPerBlock)), static_cast<unsigned>(splits));
  const T* b = bias.defined() ? bias.const_data_ptr<T>() : nullptr;
  csr_skinny_kernel<T, I, NT><<<grid, kThreads, 0, stream>>>(
      reinterpret_cast<const uint16_t*>(x.const_data_ptr()), crow.const_data_ptr<int32_t>(),
      col.const_data_ptr<I>(), reinterpret_cast<const uint16_t*>(values.const_data_ptr()), b,
      y.mutable_data_ptr<T>(), splits > 1 ? partial.mutable_data_ptr<float>() : nullptr, static_cast<int>(M),
      static_cast<int>(N), static_cast<int>(K), static_cast<int>(cps), x_vec);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (splits > 1) {
    constexpr int kReduceThreads = 256;
    const int64_t mn = M * N;
    csr_skinny_reduce_kernel<T><<<static_cast<unsigned>(ceil_div(mn, kReduceThreads)), kReduceThreads, 0, stream>>>(
        partial.const_data_ptr<float>(), b, y.mutable_data_ptr<T>(), mn, static_cast<int>(N),
        static_cast<int>(splits));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T, typename I>
void launch_nt(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
               const at::Tensor& bias, at::Tensor& y, int64_t splits, int64_t cps, cudaStream_t stream) {
  const int64_t M = x.size(0);
  if (M <= 8) launch_typed<T, I, 1>(x, crow, col, values, bias, y, splits, cps, stream);
  else if (M <= 16) launch_typed<T, I, 2>(x, crow, col, values, bias, y, splits, cps, stream);
  else if (M <= 32) launch_typed<T, I, 4>(x, crow, col, values, bias, y, splits, cps, stream);
  else launch_typed<T, I, 8>(x, crow, col, values, bias, y, splits, cps, stream);
}

// The raw launcher: y [M, N] (allocated by the caller) = x @ W^T (+ bias), no applicability or self-check
// (can_run must hold). splits > 0 forces the split-K count (clamped to the chunks of K), 0 chooses.
void launch_skinny(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                   const at::Tensor& bias, at::Tensor& y, int64_t splits_requested, cudaStream_t stream) {
  const auto [splits, cps] = plan_splits(y.size(1), x.size(1), x.get_device(), splits_requested);
  const bool col16 = col.scalar_type() == at::kShort;
  if (x.scalar_type() == at::kHalf) {
    if (col16) launch_nt<c10::Half, int16_t>(x, crow, col, values, bias, y, splits, cps, stream);
    else launch_nt<c10::Half, int32_t>(x, crow, col, values, bias, y, splits, cps, stream);
  } else {
    if (col16) launch_nt<c10::BFloat16, int16_t>(x, crow, col, values, bias, y, splits, cps, stream);
    else launch_nt<c10::BFloat16, int32_t>(x, crow, col, values, bias, y, splits, cps, stream);
  }
}

// ------------------------------------------------------------------------------------------------ self-check
// A fixed CSR problem built on the host: about 30% of the entries of W kept by a hash, every 7th row and the
// last row empty, values in {+-0.5, +-1, +-1.5, +-2} and x in {0, +-0.5, +-1}: every product and partial sum is
// a multiple of 1/4 far below 2^22, exact in fp32 in any order, so both kernels must round the same sums to the
// same fp16/bf16 outputs (bit-identical; a fragment or cursor error changes sums by at least 1/4).
struct ProbeCase {
  int64_t M, N, K, splits;  // splits 0: the launcher chooses
  bool int32_cols, with_bias;
};

std::string run_probe_case(const ProbeCase& pc, at::ScalarType dtype, const at::Device& device,
                           sparsekit_cuda::CsrMmGeneric generic, cudaStream_t stream) {
  const int64_t M = pc.M, N = pc.N, K = pc.K;
  std::vector<int32_t> crow_h{0}, col_h;
  std::vector<float> val_h;
  for (int64_t r = 0; r < N; ++r) {
    if (r % 7 != 3 && r != N - 1) {
      for (int64_t k = 0; k < K; ++k) {
        const int64_t h = (r * 131 + k * 71 + r * k * 7 + 17) % 97;
        if (h < 29) {
          col_h.push_back(static_cast<int32_t>(k));
          const float mag = 0.5f * static_cast<float>(1 + h % 4);
          val_h.push_back(h % 2 == 0 ? mag : -mag);
        }
      }
    }
    crow_h.push_back(static_cast<int32_t>(col_h.size()));
  }
  std::vector<float> x_h(M * K), b_h(N);
  for (int64_t i = 0; i < M * K; ++i) x_h[i] = 0.5f * static_cast<float>((i * 37 + 11) % 5 - 2);
  for (int64_t i = 0; i < N; ++i) b_h[i] = 0.25f * static_cast<float>(i % 9 - 4);
  const int64_t nnz = static_cast<int64_t>(col_h.size());
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const at::Tensor crow = at::from_blob(crow_h.data(), {N + 1}, at::TensorOptions().dtype(at::kInt)).to(device);
  at::Tensor col = at::from_blob(col_h.data(), {nnz}, at::TensorOptions().dtype(at::kInt)).to(device);
  if (!pc.int32_cols) col = col.to(at::kShort);
  const at::Tensor values = at::from_blob(val_h.data(), {nnz}, f32).to(device, dtype);
  const at::Tensor x = at::from_blob(x_h.data(), {M, K}, f32).to(device, dtype);
  const at::Tensor bias = pc.with_bias ? at::from_blob(b_h.data(), {N}, f32).to(device, dtype) : at::Tensor();

  at::Tensor y = at::empty({M, N}, x.options());
  launch_skinny(x, crow, col, values, bias, y, pc.splits, stream);
  const at::Tensor ref = generic(x, crow, col, values, bias, N).to(at::kFloat);
  const at::Tensor diff = (y.to(at::kFloat) - ref).abs();
  const float err = diff.max().item<float>();
  if (err == 0.f) return "";
  const int64_t at_flat = diff.view({-1}).argmax().item<int64_t>();
  return std::string(sparsekit_cuda::probe_dtype_name(dtype)) + " M=" + std::to_string(M) +
         " N=" + std::to_string(N) + " K=" + std::to_string(K) + " splits=" + std::to_string(pc.splits) +
         (pc.int32_cols ? " int32" : " int16") + " columns: max |skinny - generic| = " + std::to_string(err) +
         " at y[" + std::to_string(at_flat / N) + ", " + std::to_string(at_flat % N) + "]";
}

std::string probe(const at::Device& device, sparsekit_cuda::CsrMmGeneric generic, cudaStream_t stream) {
  // tails in M (every n-tile count), N (partial row blocks and warps), K (partial chunks, K % 8 != 0 for the
  // plain x loads), one split and several (mid-row cursors found by the search), both column index types
  const ProbeCase cases[] = {
      {13, 83, 200, 1, false, true},  {13, 83, 200, 2, false, false}, {5, 70, 333, 3, true, true},
      {29, 150, 520, 0, true, true},   {40, 130, 1000, 0, false, true}, {64, 19, 77, 1, true, false},
      {1, 45, 3000, 7, false, true},
  };
  for (const auto dtype : {at::kHalf, at::kBFloat16}) {
    for (const ProbeCase& pc : cases) {
      std::string mismatch = run_probe_case(pc, dtype, device, generic, stream);
      if (!mismatch.empty()) return mismatch;
    }
  }
  return "";
}

struct CsrSkinnyTag {};

}  // namespace

namespace sparsekit_cuda {

bool csr_mm_skinny(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                   const at::Tensor& bias, int64_t n, at::Tensor& y, CsrMmGeneric generic, cudaStream_t stream,
                   SkinnyRule rule) {
  if (!can_run(x, values, n)) return false;
  const PathMode mode = path_mode(kEnv);
  if (mode == PathMode::kOff) return false;
  if (mode == PathMode::kAuto) {
    const double density = static_cast<double>(values.numel()) / (static_cast<double>(n) * x.size(1));
    if (rule == SkinnyRule::kAuto && (density < kMinDensity || density > kMaxDensity)) return false;
    // (selfcheck.cuh never probes while the stream captures a CUDA graph: such calls take the generic kernel)
    const auto run_probe = [&] { return probe(x.device(), generic, stream); };
    if (!path_enabled<CsrSkinnyTag>(kEnv, x.get_device(), run_probe)) return false;
  }
  y = at::empty({x.size(0), n}, x.options());
  launch_skinny(x, crow, col, values, bias, y, 0, stream);
  return true;
}

}  // namespace sparsekit_cuda
