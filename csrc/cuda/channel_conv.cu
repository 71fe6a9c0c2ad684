// CUDA kernels for sparsekit::channel_gather_conv2d (schema and semantics in csrc/ops.cpp):
//
//   y = conv2d(x[:, in_idx], weight, bias, stride, padding, dilation, groups)
//       (with out_idx: a zero [B, n_out, Ho, Wo] tensor whose channels out_idx[n] hold output channel n)
//
// for a layer whose input channels were compacted to in_idx while the stream it reads (a shortcut, a concat
// stream) keeps all its channels. The unfused path copies the kept channels out (index_select) before the
// convolution; here the gather happens inside the convolution's input load, so the kept activations are
// never materialised. Any kernel size, stride, padding, dilation and groups; x in any strides (NCHW,
// channels_last, slices); y is channels_last when x is (channels_last-contiguous and not NCHW-contiguous),
// NCHW-contiguous otherwise. float32/float64/float16/bfloat16, 16-bit types accumulate in fp32.
//
// Implicit GEMM, per (image b, group g): Y[n, p] = sum_r W[n, r] * X[r, p] over output channels n of the group,
// output pixels p = (oh, ow) and the reduction r = (c, i, j) in weight order (kept channel c of the group,
// kernel tap i, j), with X[r, p] = x[b, in_idx[g*Kg + c], oh*sh - ph + i*dh, ow*sw - pw + j*dw] (0 outside the
// image). One thread block per (64 output channels, 64 output pixels, b, g). Per BK-wide slice of r, the
// decomposition r -> (x channel offset of in_idx[.], i*dh, j*dw) is computed once into a small shared table;
// each thread owns one pixel of the X tile, so a tile element costs one table lookup, an add and a bounds test.
// Consecutive threads take consecutive pixels: coalesced reads for NCHW stride-1 convolutions.
//
//   generic (every dtype): CUDA cores, W and X tiles staged in shared memory (BK = 16), 256 threads with a 4x4
//            register tile each. The reference for the self-check of the path below.
//   tensor cores (fp16/bf16, compute capability >= 8.0): mma.sync.m16n8k16 (row.col, fp32 accumulators),
//            BK = 32, 4 warps each owning 32 channels x 32 pixels; the next slice's global loads (raw 16-bit
//            values into registers) are issued before the current slice's MMAs. W tile stored [n][r] and X tile
//            [p][r] (r contiguous, rows padded by 8 elements: bank-conflict-free fragment loads), which are the
//            "row" A and "col" B operands as they are. Gated by selfcheck.cuh (SPARSEKIT_CHANNEL_CONV_TC=0/1/force).
//            Fragment layout (PTX ISA, m16n8k16 .f16/.bf16): g = lane / 4, t = lane % 4;
//              A regs a0..a3: (row g, k 2t..2t+1), (row g+8, k 2t..), (row g, k 2t+8..), (row g+8, k 2t+8..)
//              B regs b0, b1: (k 2t..2t+1, col g), (k 2t+8..2t+9, col g)
//              C regs c0..c3: (row g, col 2t), (row g, col 2t+1), (row g+8, col 2t), (row g+8, col 2t+1)
//
// Not here: the backward (sparsekit/ops/_library.py computes it with torch's convolution_backward on the
// gathered operand and index_add); a channels_last-specific load order (channels_last x is read through its
// strides with the same pixel-major order, correct but with uncoalesced loads); cp.async / TMA pipelining.
//
// Index data (in_idx in [0, C), out_idx unique in [0, n_out)) is trusted here (checking it would need a device
// sync); sparsekit.ops.channel validates it for CPU tensors.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/abs.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/max.h>
#include <ATen/ops/remainder.h>
#include <ATen/ops/zero.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "mma.cuh"
#include "checks.cuh"
#include "selfcheck.cuh"

#include <algorithm>
#include <climits>
#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

namespace {

constexpr int kTileN = 64;            // output channels per thread block
constexpr int kTileP = 64;            // output pixels per thread block
constexpr int kFar = -(1 << 29);      // a row/column offset that fails every bounds test
constexpr int64_t kMaxSide = 1 << 28; // spatial extents (padded, dilated) stay far from int overflow

// Geometry shared by both kernels (strides in elements).
struct Geom {
  int64_t sxb, sxc, sxh, sxw;  // x
  int64_t syb, syc, syh, syw;  // y
  int H, W, Wo, P;             // input height/width, output width, output pixels per image
  int sh, sw, ph, pw, dh, dw, kh, kw;
  int Kg, Ng, Ktot;            // kept input channels, output channels, reduction length (Kg*kh*kw) per group
  int ntiles, ptiles, groups;  // thread blocks along channels and pixels; groups
  bool in64, out64;            // in_idx / out_idx are int64 (else int32)
};

__device__ __forceinline__ int64_t load_index(const void* p, bool is64, int64_t i) {
  return is64 ? static_cast<const int64_t*>(p)[i] : static_cast<int64_t>(static_cast<const int32_t*>(p)[i]);
}

// Block index -> (channel tile, pixel tile, group, image); channel tiles vary fastest, so the blocks that
// share an X tile (the expensive gathered operand) run close together.
struct BlockPos {
  int nt, pt, g;
  int64_t b;
};

__device__ __forceinline__ BlockPos block_pos(const Geom& G) {
  unsigned id = blockIdx.x;  // 32-bit divisions: the grid has at most INT_MAX blocks
  BlockPos pos;
  pos.nt = static_cast<int>(id % unsigned(G.ntiles));
  id /= unsigned(G.ntiles);
  pos.pt = static_cast<int>(id % unsigned(G.ptiles));
  id /= unsigned(G.ptiles);
  pos.g = static_cast<int>(id % unsigned(G.groups));
  pos.b = static_cast<int64_t>(id / unsigned(G.groups));
  return pos;
}

// Shared table for reduction entries k0 .. k0+BK-1: x offset of (channel in_idx[g*Kg + c], tap i, j), and the
// tap's row/column offsets i*dh, j*dw (kFar past the end of the reduction). Called by all threads; threads
// with threadIdx.x < BK write.
template <int BK>
__device__ __forceinline__ void fill_table(int64_t* toff, int* trow, int* tcol, int k0, const Geom& G,
                                           const void* in_idx, int g) {
  const int kk = threadIdx.x;
  if (kk < BK) {
    const int r = k0 + kk;
    int64_t off = 0;
    int dr = kFar, dc = kFar;
    if (r < G.Ktot) {
      const int taps = G.kh * G.kw;
      const int c = r / taps, rem = r - c * taps, i = rem / G.kw, j = rem - i * G.kw;
      const int64_t ch = load_index(in_idx, G.in64, int64_t(g) * G.Kg + c);
      dr = i * G.dh;
      dc = j * G.dw;
      off = ch * G.sxc + int64_t(dr) * G.sxh + int64_t(dc) * G.sxw;
    }
    toff[kk] = off;
    trow[kk] = dr;
    tcol[kk] = dc;
  }
}

// Per-thread pixel of the X tile: the x offset of its (ih0, iw0) = top-left input position, and ih0/iw0
// (kFar for a pixel past the end).
struct PixelBase {
  int64_t off;
  int ih0, iw0;
};

__device__ __forceinline__ PixelBase pixel_base(const Geom& G, int64_t b, int p) {
  PixelBase pb{0, kFar, kFar};
  if (p < G.P) {
    const int oh = p / G.Wo, ow = p - oh * G.Wo;
    pb.ih0 = oh * G.sh - G.ph;
    pb.iw0 = ow * G.sw - G.pw;
    pb.off = b * G.sxb + int64_t(pb.ih0) * G.sxh + int64_t(pb.iw0) * G.sxw;
  }
  return pb;
}

__device__ __forceinline__ bool inside(const Geom& G, const PixelBase& pb, int dr, int dc) {
  return static_cast<unsigned>(pb.ih0 + dr) < static_cast<unsigned>(G.H) &&
         static_cast<unsigned>(pb.iw0 + dc) < static_cast<unsigned>(G.W);
}

// Output element (b, output channel n of group g, pixel p) with the bias of compact channel g*Ng + n.
template <typename T, typename A>
__device__ __forceinline__ void store_out(T* __restrict__ y, const T* __restrict__ bias, const void* out_idx,
                                          const Geom& G, int64_t b, int g, int n, int p, A v) {
  const int64_t cn = int64_t(g) * G.Ng + n;
  if (bias != nullptr) v += static_cast<A>(bias[cn]);
  const int64_t oc = out_idx != nullptr ? load_index(out_idx, G.out64, cn) : cn;
  const int oh = p / G.Wo, ow = p - oh * G.Wo;
  y[b * G.syb + oc * G.syc + int64_t(oh) * G.syh + int64_t(ow) * G.syw] = static_cast<T>(v);
}

// ------------------------------------------------------------------------------------ generic (CUDA cores)
constexpr int kSimtThreads = 256;
constexpr int kSimtK = 16;  // reduction slice

template <typename T, typename A>
__global__ void __launch_bounds__(kSimtThreads)
channel_conv_simt_kernel(const T* __restrict__ x, const void* __restrict__ in_idx, const T* __restrict__ w,
                         const T* __restrict__ bias, const void* __restrict__ out_idx, T* __restrict__ y, Geom G) {
  constexpr int BK = kSimtK;
  __shared__ A ws[BK][kTileN + 1];  // ws[kk][n]; +1: the column-order stores below spread over the banks
  __shared__ A xs[BK][kTileP];      // xs[kk][p]
  __shared__ int64_t toff[BK];
  __shared__ int trow[BK], tcol[BK];

  const BlockPos pos = block_pos(G);
  const int n0 = pos.nt * kTileN, p0 = pos.pt * kTileP;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int pl = tid % kTileP, kb = tid / kTileP;  // X-tile loads: pixel pl, rows kb, kb + 4, ...
  constexpr int kRowsPerPass = kSimtThreads / kTileP;
  const PixelBase pb = pixel_base(G, pos.b, p0 + pl);
  const T* wg = w + int64_t(pos.g) * G.Ng * G.Ktot;

  A acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = A(0);
  }

  for (int k0 = 0; k0 < G.Ktot; k0 += BK) {
    fill_table<BK>(toff, trow, tcol, k0, G, in_idx, pos.g);
    __syncthreads();  // table ready; every thread is done with the previous tiles
    for (int idx = tid; idx < kTileN * BK; idx += kSimtThreads) {
      const int kk = idx % BK, nl = idx / BK;  // consecutive threads: consecutive r of one weight row
      const int n = n0 + nl, r = k0 + kk;
      ws[kk][nl] = (n < G.Ng && r < G.Ktot) ? static_cast<A>(wg[int64_t(n) * G.Ktot + r]) : A(0);
    }
#pragma unroll
    for (int kk = kb; kk < BK; kk += kRowsPerPass) {
      A v = A(0);
      if (inside(G, pb, trow[kk], tcol[kk])) v = static_cast<A>(x[pb.off + toff[kk]]);
      xs[kk][pl] = v;
    }
    __syncthreads();
#pragma unroll 4
    for (int kk = 0; kk < BK; ++kk) {
      A a[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = ws[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) bv[j] = xs[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * bv[j];
      }
    }
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int n = n0 + ty + 16 * i;
    if (n >= G.Ng) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int p = p0 + tx + 16 * j;
      if (p < G.P) store_out<T, A>(y, bias, out_idx, G, pos.b, pos.g, n, p, acc[i][j]);
    }
  }
}

// ----------------------------------------------------------------------------- tensor cores (fp16 / bf16)
constexpr int kTcThreads = 128;  // 4 warps, 2 x 2 over the 64 x 64 tile
constexpr int kTcK = 32;         // reduction slice
constexpr int kTcLdw = (kTcK + 8) / 2;  // shared row length in 32-bit words (8 elements of padding)

using sparsekit_cuda::mma_16816;

// 16-bit values are moved as raw bits (uint16_t): zero is all-zero bits in both fp16 and bf16, and a pair of
// consecutive reduction entries packs into one 32-bit operand register (lower index in the low half).
template <typename T>
__global__ void __launch_bounds__(kTcThreads)
channel_conv_tc_kernel(const T* __restrict__ x_in, const void* __restrict__ in_idx, const T* __restrict__ w_in,
                       const T* __restrict__ bias, const void* __restrict__ out_idx, T* __restrict__ y, Geom G) {
  constexpr int BK = kTcK, LDW = kTcLdw, PAIRS = BK / 2;
  constexpr int kLoads = kTileN * PAIRS / kTcThreads;  // = kTileP * PAIRS / kTcThreads = 8 pairs per operand
  __shared__ uint32_t ws[kTileN * LDW];  // ws[n][r pair]
  __shared__ uint32_t xs[kTileP * LDW];  // xs[p][r pair]
  __shared__ int64_t toff[2][BK];
  __shared__ int trow[2][BK], tcol[2][BK];

  const uint16_t* x = reinterpret_cast<const uint16_t*>(x_in);
  const BlockPos pos = block_pos(G);
  const int n0 = pos.nt * kTileN, p0 = pos.pt * kTileP;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, gq = lane >> 2, tq = lane & 3;
  const int wm = warp >> 1, wn = warp & 1;
  const int pl = tid % kTileP, qb = tid / kTileP;  // X-tile loads: pixel pl, pairs qb, qb + 2, ...
  constexpr int kPairStep = kTcThreads / kTileP;
  const PixelBase pb = pixel_base(G, pos.b, p0 + pl);
  const uint16_t* wg = reinterpret_cast<const uint16_t*>(w_in) + int64_t(pos.g) * G.Ng * G.Ktot;
  const int nkt = (G.Ktot + BK - 1) / BK;

  float acc[2][4][4];
#pragma unroll
  for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
    for (int ni = 0; ni < 4; ++ni) acc[mi][ni][0] = acc[mi][ni][1] = acc[mi][ni][2] = acc[mi][ni][3] = 0.f;
  }
  uint32_t ra[kLoads], rb[kLoads];

  // global -> registers for the slice starting at k0, through table `tb`
  auto load_slice = [&](int k0, int tb) {
#pragma unroll
    for (int s = 0; s < kLoads; ++s) {
      const int idx = tid + s * kTcThreads, nl = idx / PAIRS, q = idx % PAIRS;
      const int n = n0 + nl, r = k0 + 2 * q;
      uint32_t lo = 0, hi = 0;
      if (n < G.Ng) {
        const uint16_t* wr = wg + int64_t(n) * G.Ktot;
        if (r < G.Ktot) lo = wr[r];
        if (r + 1 < G.Ktot) hi = wr[r + 1];
      }
      ra[s] = lo | (hi << 16);
    }
#pragma unroll
    for (int s = 0; s < kLoads; ++s) {
      const int kk = 2 * (qb + s * kPairStep);
      uint32_t lo = 0, hi = 0;
      if (inside(G, pb, trow[tb][kk], tcol[tb][kk])) lo = x[pb.off + toff[tb][kk]];
      if (inside(G, pb, trow[tb][kk + 1], tcol[tb][kk + 1])) hi = x[pb.off + toff[tb][kk + 1]];
      rb[s] = lo | (hi << 16);
    }
  };

  if (nkt > 0) {
    fill_table<BK>(toff[0], trow[0], tcol[0], 0, G, in_idx, pos.g);
    __syncthreads();
    load_slice(0, 0);
  }
  for (int kt = 0; kt < nkt; ++kt) {
    // registers -> shared (every thread finished reading the previous slice at the loop's last barrier)
#pragma unroll
    for (int s = 0; s < kLoads; ++s) {
      const int idx = tid + s * kTcThreads;
      ws[(idx / PAIRS) * LDW + idx % PAIRS] = ra[s];
      xs[pl * LDW + qb + s * kPairStep] = rb[s];
    }
    const bool more = kt + 1 < nkt;
    const int tb = (kt + 1) & 1;  // its last reader, load_slice(kt - 1), finished two barriers ago
    if (more) fill_table<BK>(toff[tb], trow[tb], tcol[tb], (kt + 1) * BK, G, in_idx, pos.g);
    __syncthreads();
    if (more) load_slice((kt + 1) * BK, tb);  // in flight during the MMAs below
#pragma unroll
    for (int ks = 0; ks < BK / 2; ks += 8) {  // word offset of each 16-wide k step
      uint32_t a[2][4];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
        const uint32_t* wa = ws + (wm * 32 + mi * 16 + gq) * LDW + ks + tq;
        a[mi][0] = wa[0];
        a[mi][1] = wa[8 * LDW];
        a[mi][2] = wa[4];
        a[mi][3] = wa[8 * LDW + 4];
      }
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) {
        const uint32_t* xb = xs + (wn * 32 + ni * 8 + gq) * LDW + ks + tq;
        const uint32_t b0 = xb[0], b1 = xb[4];
        mma_16816<T>(acc[0][ni], a[0], b0, b1);
        mma_16816<T>(acc[1][ni], a[1], b0, b1);
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // h = 0: row g, h = 1: row g + 8
      const int n = n0 + wm * 32 + mi * 16 + gq + 8 * h;
      if (n >= G.Ng) continue;
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int p = p0 + wn * 32 + ni * 8 + 2 * tq + j;
          if (p < G.P) store_out<T, float>(y, bias, out_idx, G, pos.b, pos.g, n, p, acc[mi][ni][2 * h + j]);
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------ host
using sparsekit_cuda::check_cuda;
using sparsekit_cuda::check_floating;
using sparsekit_cuda::check_same_dtype;
using sparsekit_cuda::checked_bias;
using sparsekit_cuda::grid_size;

enum class Path { kGeneric, kTensorCore };

void check_channel_index(const char* op, const at::Tensor& t, const char* name, const at::Tensor& ref) {
  check_cuda(op, t, name, 1, ref);
  TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, op, ": ", name,
              " must have dtype torch.int32 or torch.int64, got ", t.scalar_type());
}

bool channels_last_input(const at::Tensor& x) {
  // the same rule as sparsekit.ops.reference.channel_conv_memory_format (the fake and the reference)
  return x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
}

int checked_int(const char* op, int64_t v, const char* what) {
  TORCH_CHECK(v >= 0 && v <= INT_MAX, op, ": ", what, " (", v, ") is too large for this kernel");
  return static_cast<int>(v);
}

// Validates the arguments, allocates y, and runs the given path (kTensorCore only for fp16/bf16 on compute
// capability >= 8.0: the caller decides). Returns y.
at::Tensor channel_conv_run(const at::Tensor& x, const at::Tensor& in_idx_in, const at::Tensor& weight_in,
                            const std::optional<at::Tensor>& bias_in, const std::optional<at::Tensor>& out_idx_in,
                            std::optional<int64_t> n_out, at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, int64_t groups, const Path* forced);

at::Tensor launch(const at::Tensor& x, const at::Tensor& in_idx, const at::Tensor& weight, const at::Tensor& bias,
                  const at::Tensor& out_idx, at::Tensor& y, const Geom& G, int64_t blocks, Path path,
                  cudaStream_t stream) {
  constexpr const char* op = "sparsekit::channel_gather_conv2d";
  const unsigned grid = grid_size(op, blocks);
  const void* in_ptr = in_idx.const_data_ptr();
  const void* out_ptr = out_idx.defined() ? out_idx.const_data_ptr() : nullptr;
  if (path == Path::kTensorCore) {
    if (x.scalar_type() == at::kHalf) {
      using T = c10::Half;
      channel_conv_tc_kernel<T><<<grid, kTcThreads, 0, stream>>>(
          x.const_data_ptr<T>(), in_ptr, weight.const_data_ptr<T>(), bias.defined() ? bias.const_data_ptr<T>() : nullptr,
          out_ptr, y.mutable_data_ptr<T>(), G);
    } else {
      TORCH_CHECK(x.scalar_type() == at::kBFloat16, op, ": the tensor-core path takes float16/bfloat16");
      using T = c10::BFloat16;
      channel_conv_tc_kernel<T><<<grid, kTcThreads, 0, stream>>>(
          x.const_data_ptr<T>(), in_ptr, weight.const_data_ptr<T>(), bias.defined() ? bias.const_data_ptr<T>() : nullptr,
          out_ptr, y.mutable_data_ptr<T>(), G);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return y;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sparsekit_channel_conv_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    channel_conv_simt_kernel<scalar_t, A><<<grid, kSimtThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), in_ptr, weight.const_data_ptr<scalar_t>(),
        bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr, out_ptr, y.mutable_data_ptr<scalar_t>(), G);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

// First-use self-check of the tensor-core path (selfcheck.cuh): for fp16 and bf16, two problems with channel,
// pixel and reduction tails (70 and 2 x 40 output channels, 55 and 36 pixels, reductions of 81 and 102), a
// repeated kept channel, stride/padding/dilation, groups 2, channels_last input, the fused output scatter,
// int32 and int64 indices, and a bias; entries are small multiples of 1/8 and 1/4 (exact in both dtypes, sums
// exact in fp32), run through both kernels and compared.
std::string channel_conv_tc_probe(const at::Device& device) {
  struct Case {
    int64_t B, C, H, W, Cout, groups, kh, kw;
    std::vector<int64_t> stride, padding, dilation, in_idx, out_idx;
    int64_t n_out;
    bool channels_last, idx64;
  };
  std::vector<Case> cases;
  cases.push_back({2, 13, 9, 11, 70, 1, 3, 3, {2, 1}, {1, 2}, {1, 2}, {11, 0, 3, 3, 7, 12, 5, 9, 1}, {}, 0,
                   false, false});
  Case c2{1, 20, 7, 6, 80, 2, 2, 3, {1, 1}, {0, 1}, {1, 1}, {}, {}, 90, true, true};
  for (int64_t i = 0; i < 34; ++i) c2.in_idx.push_back((i * 7) % 20);
  for (int64_t i = 0; i < 80; ++i) c2.out_idx.push_back((i * 7) % 90);
  cases.push_back(c2);

  const auto f32 = at::TensorOptions().dtype(at::kFloat).device(device);
  for (const auto dtype : {at::kHalf, at::kBFloat16}) {
    for (const Case& c : cases) {
      const auto idx_dtype = c.idx64 ? at::kLong : at::kInt;
      auto to_index = [&](const std::vector<int64_t>& v) {
        return at::from_blob(const_cast<int64_t*>(v.data()), {static_cast<int64_t>(v.size())},
                             at::TensorOptions().dtype(at::kLong))
            .to(device, idx_dtype);
      };
      const at::Tensor in_idx = to_index(c.in_idx);
      const int64_t kg = static_cast<int64_t>(c.in_idx.size()) / c.groups;
      at::Tensor x = ((at::arange(c.B * c.C * c.H * c.W, f32).mul(3).remainder(11) - 5) * 0.125)
                         .view({c.B, c.C, c.H, c.W})
                         .to(dtype);
      if (c.channels_last) x = x.contiguous(at::MemoryFormat::ChannelsLast);
      const at::Tensor w =
          ((at::arange(c.Cout * kg * c.kh * c.kw, f32).remainder(7) - 3) * 0.25).view({c.Cout, kg, c.kh, c.kw}).to(dtype);
      const at::Tensor bias = ((at::arange(c.Cout, f32).remainder(5) - 2) * 0.5).to(dtype);
      std::optional<at::Tensor> out_idx;
      std::optional<int64_t> n_out;
      if (!c.out_idx.empty()) {
        out_idx = to_index(c.out_idx);
        n_out = c.n_out;
      }
      const Path tc = Path::kTensorCore, generic = Path::kGeneric;
      const at::Tensor y_tc = channel_conv_run(x, in_idx, w, bias, out_idx, n_out, c.stride, c.padding, c.dilation,
                                               c.groups, &tc);
      const at::Tensor y_ref = channel_conv_run(x, in_idx, w, bias, out_idx, n_out, c.stride, c.padding,
                                                c.dilation, c.groups, &generic);
      const std::string mismatch = sparsekit_cuda::probe_mismatch(
          y_tc, y_ref, 1e-2f,
          std::string(sparsekit_cuda::probe_dtype_name(dtype)) + " case " + std::to_string(&c - cases.data()));
      if (!mismatch.empty()) return mismatch;
    }
  }
  return "";
}

struct ChannelConvTensorCoreTag {};

at::Tensor channel_conv_run(const at::Tensor& x, const at::Tensor& in_idx_in, const at::Tensor& weight_in,
                            const std::optional<at::Tensor>& bias_in, const std::optional<at::Tensor>& out_idx_in,
                            std::optional<int64_t> n_out, at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, int64_t groups, const Path* forced) {
  constexpr const char* op = "sparsekit::channel_gather_conv2d";
  check_cuda(op, x, "x", 4, x);
  check_floating(op, x, "x");
  check_cuda(op, weight_in, "weight", 4, x);
  check_same_dtype(op, weight_in, "weight", x, "x");
  check_channel_index(op, in_idx_in, "in_idx", x);
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
              ": stride, padding and dilation must have 2 entries each");
  TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1, op, ": stride must be >= 1, got ", stride);
  TORCH_CHECK(dilation[0] >= 1 && dilation[1] >= 1, op, ": dilation must be >= 1, got ", dilation);
  TORCH_CHECK(padding[0] >= 0 && padding[1] >= 0, op, ": padding must be >= 0, got ", padding);
  TORCH_CHECK(groups >= 1, op, ": groups must be >= 1, got ", groups);
  const int64_t B = x.size(0), H = x.size(2), W = x.size(3);
  const int64_t Cout = weight_in.size(0), Kg = weight_in.size(1), kh = weight_in.size(2), kw = weight_in.size(3);
  TORCH_CHECK(kh >= 1 && kw >= 1, op, ": weight must have a kernel of at least 1x1, got shape ", weight_in.sizes());
  TORCH_CHECK(Cout % groups == 0, op, ": groups (", groups, ") must divide the output channels (weight.size(0) = ",
              Cout, ")");
  TORCH_CHECK(in_idx_in.numel() == Kg * groups, op, ": in_idx has ", in_idx_in.numel(),
              " entries, expected weight.size(1) * groups = ", Kg * groups);
  const at::Tensor bias = checked_bias(op, bias_in, x, "x", Cout, "weight.size(0) = ");
  at::Tensor out_idx;
  const bool scatter = out_idx_in.has_value() && out_idx_in->defined();
  TORCH_CHECK(scatter == n_out.has_value(), op, ": out_idx and n_out must be given together");
  if (scatter) {
    check_channel_index(op, *out_idx_in, "out_idx", x);
    TORCH_CHECK(out_idx_in->numel() == Cout, op, ": out_idx has ", out_idx_in->numel(),
                " entries, expected weight.size(0) = ", Cout);
    TORCH_CHECK(*n_out >= 0, op, ": n_out must be >= 0, got ", *n_out);
    out_idx = out_idx_in->contiguous();
  }
  const int64_t eh = dilation[0] * (kh - 1) + 1, ew = dilation[1] * (kw - 1) + 1;
  const int64_t hp = H + 2 * padding[0], wp = W + 2 * padding[1];
  TORCH_CHECK(hp >= eh && wp >= ew, op, ": the (dilated) kernel ", eh, "x", ew, " is larger than the padded input ",
              hp, "x", wp);
  TORCH_CHECK(hp <= kMaxSide && wp <= kMaxSide && eh <= kMaxSide && ew <= kMaxSide, op,
              ": spatial extents (padded input ", hp, "x", wp, ", dilated kernel ", eh, "x", ew, ") must stay below ",
              kMaxSide);
  const int64_t Ho = (hp - eh) / stride[0] + 1, Wo = (wp - ew) / stride[1] + 1;

  const c10::cuda::CUDAGuard guard(x.device());
  const auto fmt = channels_last_input(x) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor y = at::empty({B, scatter ? *n_out : Cout, Ho, Wo}, x.options(), fmt);
  if (scatter) y.zero_();
  if (B == 0 || Cout == 0) return y;

  Geom G{};
  G.sxb = x.stride(0);
  G.sxc = x.stride(1);
  G.sxh = x.stride(2);
  G.sxw = x.stride(3);
  G.syb = y.stride(0);
  G.syc = y.stride(1);
  G.syh = y.stride(2);
  G.syw = y.stride(3);
  G.H = static_cast<int>(H);
  G.W = static_cast<int>(W);
  G.Wo = static_cast<int>(Wo);
  // (a tile's pixel offsets p0 + pl run up to a tile past P, in int)
  TORCH_CHECK(Ho * Wo <= INT_MAX - kTileP, op, ": output pixels per image (", Ho * Wo, ") is too large for this kernel");
  G.P = static_cast<int>(Ho * Wo);
  G.sh = checked_int(op, std::min<int64_t>(stride[0], kMaxSide), "stride");
  G.sw = checked_int(op, std::min<int64_t>(stride[1], kMaxSide), "stride");
  G.ph = static_cast<int>(padding[0]);
  G.pw = static_cast<int>(padding[1]);
  G.dh = static_cast<int>(dilation[0]);
  G.dw = static_cast<int>(dilation[1]);
  G.kh = static_cast<int>(kh);
  G.kw = static_cast<int>(kw);
  G.Kg = checked_int(op, Kg, "weight.size(1)");
  G.Ng = checked_int(op, Cout / groups, "output channels per group");
  G.Ktot = checked_int(op, Kg * kh * kw, "reduction length weight.size(1) * kh * kw");
  G.ntiles = (G.Ng + kTileN - 1) / kTileN;
  G.ptiles = (G.P + kTileP - 1) / kTileP;
  G.groups = checked_int(op, groups, "groups");
  G.in64 = in_idx_in.scalar_type() == at::kLong;
  G.out64 = scatter && out_idx.scalar_type() == at::kLong;
  const int64_t blocks = int64_t(G.ntiles) * G.ptiles * G.groups * B;

  const at::Tensor weight = weight_in.contiguous(), in_idx = in_idx_in.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  Path path = Path::kGeneric;
  if (forced != nullptr) {
    path = *forced;
  } else if (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16) {
    int major = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, x.get_device()));
    if (major >= 8 && sparsekit_cuda::path_enabled<ChannelConvTensorCoreTag>(
                          "SPARSEKIT_CHANNEL_CONV_TC", x.get_device(),
                          [&] { return channel_conv_tc_probe(x.device()); })) {
      path = Path::kTensorCore;
    }
  }
  return launch(x, in_idx, weight, bias, out_idx, y, G, blocks, path, stream);
}

at::Tensor channel_gather_conv2d_cuda(const at::Tensor& x, const at::Tensor& in_idx, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& out_idx,
                                      std::optional<int64_t> n_out, at::IntArrayRef stride, at::IntArrayRef padding,
                                      at::IntArrayRef dilation, int64_t groups) {
  return channel_conv_run(x, in_idx, weight, bias, out_idx, n_out, stride, padding, dilation, groups, nullptr);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekit, CUDA, m) {
  m.impl("channel_gather_conv2d", &channel_gather_conv2d_cuda);
}
