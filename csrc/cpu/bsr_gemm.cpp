// CPU kernels for the BSR ops (schemas and semantics in csrc/ops.cpp):
//   bsr_mm     y  = x @ W^T + bias    parallel over (block-row, M tile): each task owns a tile of y
//   bsr_mm_t   dx = dy @ W            parallel over (block-column, M tile) through a block-CSC view of W
//   bsr_sddmm  dW = dy^T @ x on W's blocks, parallel over stored blocks
// float32 / bfloat16 / float16 run the SIMD micro-kernels of simd.h (AVX-512, AVX2+FMA or portable, chosen
// at run time; fp32 accumulation; bf16 weights are read as stored); float64 runs the plain loops below.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "amx.h"
#include "bf16_dot.h"
#include "checks.h"
#include "tiles.h"
#include "panel.h"
#include "simd.h"
#include "tap_tiling.h"
#include "values.h"

namespace {

using namespace sparsekit::cpu;

void check_index(const char* op, const at::Tensor& t, const char* name) {
  check_tensor(op, t, name, 1);
  TORCH_CHECK(t.scalar_type() == at::kInt, op, ": ", name, " must have dtype torch.int32, got ",
              dtype_name(t.scalar_type()));
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

void check_block(const char* op, int64_t bn, int64_t bk) {
  TORCH_CHECK(bn >= 1 && bn <= kMaxBlock && bk >= 1 && bk <= kMaxBlock, op, ": block (", bn, ", ", bk,
              ") must have both sides in [1, ", kMaxBlock, "]");
}

// Rejects index data that would read out of bounds. O(rows + nnzb), negligible next to the product.
void check_structure(const char* op, const at::Tensor& crow, const at::Tensor& col, int64_t rows, int64_t cols) {
  TORCH_CHECK(crow.numel() == rows + 1, op, ": crow_indices must have N/block_n + 1 = ", rows + 1,
              " entries, got ", crow.numel());
  const int32_t* cr = crow.data_ptr<int32_t>();
  const int32_t* cc = col.data_ptr<int32_t>();
  const int64_t nnzb = col.numel();
  TORCH_CHECK(cr[0] == 0 && cr[rows] == nnzb, op, ": crow_indices must start at 0 and end at nnzb=", nnzb,
              ", got ", cr[0], "..", cr[rows]);
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(cr[r] <= cr[r + 1], op, ": crow_indices must be non-decreasing, got ", cr[r], " > ", cr[r + 1],
                " at block-row ", r);
  }
  for (int64_t b = 0; b < nnzb; ++b) {
    TORCH_CHECK(cc[b] >= 0 && cc[b] < cols, op, ": col_indices must lie in [0, K/block_k = ", cols, "), got ",
                cc[b], " at position ", b);
  }
}

// The arguments bsr_mm, bsr_mm_xt and bsr_mm_t share: the dense operand act and values [nnzb, bn, bk]
// (check_operands), the int32 index tensors and the block shape, which it returns.
std::pair<int64_t, int64_t> check_bsr_operands(const char* op, const at::Tensor& act, const char* act_name,
                                               int64_t act_dim, const at::Tensor& crow, const at::Tensor& col,
                                               const at::Tensor& values) {
  check_operands(op, act, act_name, act_dim, values, 3);
  check_index(op, crow, "crow_indices");
  check_index(op, col, "col_indices");
  const int64_t bn = values.size(1), bk = values.size(2);
  check_block(op, bn, bk);
  return {bn, bk};
}

// One block of values per col index, and the pattern within rows x cols blocks (check_structure).
void check_blocks(const char* op, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                  int64_t rows, int64_t cols) {
  TORCH_CHECK(col.numel() == values.size(0), op, ": col_indices has ", col.numel(), " entries but values has ",
              values.size(0), " blocks");
  check_structure(op, crow, col, rows, cols);
}

// The checks of bsr_mm and bsr_mm_xt (act = x [M, K] or xt [B, K, M]: K = act.size(1) in both, W is [n, K]);
// returns the block shape and the bias (checked_bias: undefined when absent, else contiguous).
std::tuple<int64_t, int64_t, at::Tensor> check_bsr_mm_args(const char* op, const at::Tensor& act, const char* act_name,
                                                           int64_t act_dim, const at::Tensor& crow,
                                                           const at::Tensor& col, const at::Tensor& values,
                                                           const std::optional<at::Tensor>& bias, int64_t n) {
  const auto [bn, bk] = check_bsr_operands(op, act, act_name, act_dim, crow, col, values);
  const int64_t K = act.size(1);
  TORCH_CHECK(n >= 0 && n % bn == 0, op, ": n (", n, ") must be a non-negative multiple of block_n=", bn);
  TORCH_CHECK(K % bk == 0, op, ": ", act_name, ".size(1) (K=", K, ") must be a multiple of block_k=", bk,
              " (values.size(2))");
  check_blocks(op, crow, col, values, n / bn, K / bk);
  return {bn, bk, checked_bias(op, bias, n, act, act_name)};
}


// ------------------------------------------------------------------------------------------ kernels
// y[m, r*bn + i] = sum over blocks b of block-row r: W_b[i, :] . x[m, col_b*bk : +bk]
template <int64_t MT, typename T, typename A>
void bsr_mm_kernel(const A* xp, const int32_t* crow, const int32_t* col, const A* v, const T* bias, T* y,
                   int64_t M, int64_t K, int64_t N, int64_t bn, int64_t bk) {
  const int64_t rows = N / bn, tiles = (M + MT - 1) / MT;
  const int64_t avg_work = rows ? MT * (crow[rows] / rows + 1) * bn * bk : 1;
  // task = (M tile, block-row), block-row fastest: a thread's chunk reuses one packed x tile
  at::parallel_for(0, tiles * rows, grain_for(avg_work), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r = t % rows, m0 = (t / rows) * MT, mc = std::min(MT, M - m0);
      const A* xt = xp + (t / rows) * K * MT;
      const int64_t b0 = crow[r], b1 = crow[r + 1];
      for (int64_t i = 0; i < bn; ++i) {
        Tile<A, MT> acc;
        for (int64_t b = b0; b < b1; ++b) {
          const A* w = v + (b * bn + i) * bk;
          const A* xc = xt + int64_t(col[b]) * bk * MT;
          if constexpr (MT == 1) {
            acc.acc1 += dot(w, xc, bk);  // a single row of x: a contiguous dot along the block row
          } else {
            for (int64_t kk = 0; kk < bk; ++kk) acc.fma(w[kk], xc + kk * MT);
          }
        }
        const A bv = bias ? static_cast<A>(bias[r * bn + i]) : A(0);
        for (int64_t j = 0; j < mc; ++j) y[(m0 + j) * N + r * bn + i] = static_cast<T>(acc[j] + bv);
      }
    }
  });
}

// Block-CSC view of the pattern: the stored blocks of each block-column, block-rows ascending.
struct BlockColumns {
  std::vector<int64_t> ptr;    // [cols + 1]
  std::vector<int64_t> block;  // [nnzb] block id
  std::vector<int64_t> row;    // [nnzb] its block-row
};

BlockColumns block_columns(const int32_t* crow, const int32_t* col, int64_t rows, int64_t cols) {
  const int64_t nnzb = crow[rows];
  BlockColumns t{std::vector<int64_t>(cols + 1, 0), std::vector<int64_t>(nnzb), std::vector<int64_t>(nnzb)};
  for (int64_t b = 0; b < nnzb; ++b) ++t.ptr[col[b] + 1];
  for (int64_t c = 0; c < cols; ++c) t.ptr[c + 1] += t.ptr[c];
  std::vector<int64_t> next(t.ptr.begin(), t.ptr.end() - 1);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t b = crow[r]; b < crow[r + 1]; ++b) {
      const int64_t p = next[col[b]]++;
      t.block[p] = b;
      t.row[p] = r;
    }
  }
  return t;
}

// dx[m, c*bk + kk] = sum over blocks b of block-column c: dy[m, row_b*bn : +bn] . W_b[:, kk]
// Walking the block-columns gives each task its own tile of dx: no atomics, no private copies of dx.
template <int64_t MT, typename T, typename A>
void bsr_mm_t_kernel(const A* dyp, const int32_t* crow, const int32_t* col, const A* v, T* dx, int64_t M,
                     int64_t K, int64_t N, int64_t bn, int64_t bk) {
  const int64_t rows = N / bn, cols = K / bk, tiles = (M + MT - 1) / MT;
  const BlockColumns bc = block_columns(crow, col, rows, cols);
  const int64_t avg_work = cols ? MT * (crow[rows] / cols + 1) * bn * bk : 1;
  at::parallel_for(0, tiles * cols, grain_for(avg_work), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t c = t % cols, m0 = (t / cols) * MT, mc = std::min(MT, M - m0);
      const A* dyt = dyp + (t / cols) * N * MT;
      const int64_t p0 = bc.ptr[c], p1 = bc.ptr[c + 1];
      for (int64_t kk = 0; kk < bk; ++kk) {
        Tile<A, MT> acc;
        for (int64_t p = p0; p < p1; ++p) {
          const A* w = v + bc.block[p] * bn * bk + kk;  // column kk of the block, stride bk
          const A* d = dyt + bc.row[p] * bn * MT;
          for (int64_t i = 0; i < bn; ++i) acc.fma(w[i * bk], d + i * MT);
        }
        for (int64_t j = 0; j < mc; ++j) dx[(m0 + j) * K + c * bk + kk] = static_cast<T>(acc[j]);
      }
    }
  });
}

// The block-row of every stored block (the SDDMMs run over blocks, not rows).
std::vector<int64_t> block_rows(const int32_t* crow, int64_t rows) {
  std::vector<int64_t> row_of(crow[rows]);
  for (int64_t r = 0; r < rows; ++r) std::fill(row_of.begin() + crow[r], row_of.begin() + crow[r + 1], r);
  return row_of;
}

// out[b, i, kk] = dy[:, row_b*bn + i] . x[:, col_b*bk + kk], from transposed copies dyT [N, M], xT [K, M]
// so that every dot is contiguous over M.
template <typename T, typename A>
void bsr_sddmm_kernel(const A* dyT, const A* xT, const int32_t* crow, const int32_t* col, T* out, int64_t M,
                      int64_t N, int64_t bn, int64_t bk) {
  const int64_t rows = N / bn, nnzb = crow[rows];
  const std::vector<int64_t> row_of = block_rows(crow, rows);
  at::parallel_for(0, nnzb, grain_for(M * bn * bk), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const A* d = dyT + row_of[b] * bn * M;
      const A* xc = xT + int64_t(col[b]) * bk * M;
      T* o = out + b * bn * bk;
      for (int64_t i = 0; i < bn; ++i)
        for (int64_t kk = 0; kk < bk; ++kk) o[i * bk + kk] = static_cast<T>(dot(d + i * M, xc + kk * M, M));
    }
  });
}

// ------------------------------------------------------------------------------------ AMX (bf16)
// Bytes of packed blocks per chunk: what L2 (2 MiB per core on Sapphire Rapids) holds beside one tile of x
// (kAmxMT rows of K), within [256 KiB, 1 MiB]. Larger chunks re-stream x fewer times (2048x4096x4096 at 50%:
// 30 -> 23 ms from 256 KiB to 1 MiB); smaller ones leave room for x's tile when K is long.
int64_t amx_chunk_bytes(int64_t K) {
  return std::clamp<int64_t>(1536 * 1024 - kAmxMT * K * 2, 256 * 1024, 1024 * 1024);
}

// Nonzero-balanced chunks of block-rows whose blocks stay in L2 (amx_chunk_bytes) while every tile of x passes
// them, and at least enough of them for 4 tasks per thread over `tiles` tiles of x.
std::vector<int64_t> amx_chunks(const int32_t* crow, int64_t rows, int64_t bn, int64_t bk, int64_t K, int64_t tiles,
                                int64_t threads) {
  const int64_t l2_chunks = (crow[rows] * bn * bk * 2 + amx_chunk_bytes(K) - 1) / amx_chunk_bytes(K);
  return balanced_chunks(crow, rows, std::max((4 * threads + tiles - 1) / tiles, l2_chunks), bn * bk, bn);
}

// y = x @ W^T (+ bias) for bfloat16 x and values on AMX tiles (amx.h): blocks packed into VNNI order per chunk;
// tasks = (nonzero-balanced chunk of block-rows, kAmxMT rows of x), chunks outermost and small enough to stay
// in L2 while every tile of x passes (weights would otherwise stream from memory once per tile);
// block-rows are computed `group` at a time (>= 64 contiguous outputs per row of y) into fp32 rows and stored.
void bsr_mm_amx(const uint16_t* x, const int32_t* crow, const int32_t* col, const uint16_t* v, const float* bias,
                uint16_t* y, int64_t M, int64_t K, int64_t N, int64_t bn, int64_t bk) {
  const int64_t rows = N / bn, nnzb = crow[rows], threads = at::get_num_threads();
  const int64_t tiles = (M + kAmxMT - 1) / kAmxMT;
  const std::vector<int64_t> bounds = amx_chunks(crow, rows, bn, bk, K, tiles, threads);
  const int64_t chunks = int64_t(bounds.size()) - 1, tasks = tiles * chunks;
  const int64_t grain = M * nnzb * bn * bk < kMinWork ? tasks : 1;
  const int64_t group = std::max<int64_t>(1, 64 / bn), ldo = group * bn;
  at::parallel_for(0, tasks, grain, [&](int64_t t0, int64_t t1) {
    const AmxTileScope tiles_configured(bk);
    std::vector<float> out(kAmxMT * ldo);
    std::vector<uint16_t> tail;
    std::vector<uint32_t> wv;  // the current chunk's blocks in VNNI order (packed here, so they stay in L2)
    int64_t packed = -1;
    for (int64_t t = t0; t < t1; ++t) {  // chunk-major: a thread's consecutive tasks share a chunk's blocks
      const int64_t c = t / tiles, tile = t % tiles, m0 = tile * kAmxMT, mc = std::min(kAmxMT, M - m0);
      const int64_t b0 = crow[bounds[c]], b1 = crow[bounds[c + 1]];
      if (c != packed) {
        wv.resize((b1 - b0) * bn * bk / 2);
        amx_pack_w(v, b0, b1, bn, bk, wv.data());
        packed = c;
      }
      const uint16_t* xt = x + m0 * K;
      if (mc < kAmxMT) {  // the last, partial tile: read from a zero-padded copy (made once per thread)
        if (tail.empty()) {
          tail.assign(kAmxMT * K, 0);
          std::memcpy(tail.data(), xt, mc * K * sizeof(uint16_t));
        }
        xt = tail.data();
      }
      for (int64_t r0 = bounds[c]; r0 < bounds[c + 1]; r0 += group) {
        const int64_t r1 = std::min(bounds[c + 1], r0 + group);
        amx_bsr_rows(xt, K, crow, col, r0, r1, wv.data(), b0, bn, bk, out.data(), ldo);
        amx_store_bf16(out.data(), ldo, (r1 - r0) * bn, mc, bias ? bias + r0 * bn : nullptr, y + m0 * N + r0 * bn, N);
      }
    }
  });
}

// Packs the row pairs of B images' x^T that some block reads (pack(b, r0, r1, Mp, xv_b) fills pairs [r0, r1) of
// image b, Mp words apart; image b's at xv + b * image): at 90% block sparsity a third or more of the
// block-columns are empty in every block-row, and their rows are never read.
// used[c] = 1 for the block-columns c < cols that some stored block (col[0 .. nnzb)) is in.
inline std::vector<char> used_block_columns(const int32_t* col, int64_t nnzb, int64_t cols) {
  std::vector<char> used(cols, 0);
  for (int64_t b = 0; b < nnzb; ++b) used[col[b]] = 1;
  return used;
}

template <typename Pack>
void pack_used_pairs(int64_t B, Pack&& pack, const int32_t* col, int64_t nnzb, int64_t K, int64_t bk, int64_t Mp,
                     uint32_t* xv, int64_t image) {
  const std::vector<char> used = used_block_columns(col, nnzb, K / bk);
  std::vector<std::pair<int64_t, int64_t>> runs;   // runs of used block-columns, as row-pair ranges
  for (int64_t c = 0; c < K / bk; ++c) {
    if (!used[c]) continue;
    if (!runs.empty() && runs.back().second == c * bk / 2) runs.back().second = (c + 1) * bk / 2;
    else runs.emplace_back(c * bk / 2, (c + 1) * bk / 2);
  }
  const int64_t nruns = int64_t(runs.size());
  at::parallel_for(0, B * nruns, 1, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) pack(q / nruns, runs[q % nruns].first, runs[q % nruns].second, Mp,
                                          xv + (q / nruns) * image);
  });
}

// Images are packed and computed in groups of at most kPackGroupBytes of packed x^T (a batch of large images
// packed whole took B times an image's im2col matrix: ~0.9 GB for a ResNet-50 layer1 conv at batch 256):
// run(g0, Bg, pack_g) for each group of Bg images from g0, pack_g packing the group's image b as pack(g0 + b).
constexpr int64_t kPackGroupBytes = int64_t(64) << 20;

template <typename Pack, typename Run>
void in_pack_groups(int64_t B, int64_t image_bytes, Pack&& pack, Run&& run) {
  const int64_t per_group = std::max<int64_t>(1, kPackGroupBytes / std::max<int64_t>(1, image_bytes));
  for (int64_t g0 = 0; g0 < B; g0 += per_group) {
    run(g0, std::min(per_group, B - g0), [&](int64_t b, int64_t r0, int64_t r1, int64_t mp, uint32_t* xv) {
      pack(g0 + b, r0, r1, mp, xv);
    });
  }
}

// y^T [B, N, M] = W @ x^T [B, K, M] (+ bias[:, None]) for bfloat16 on AMX tiles (amx.h, transposed layout): each
// image's x^T packed into VNNI row pairs [K/2][Mp] (Mp = M rounded up to 32); tasks = (L2-sized chunk of
// block-rows, 32 columns of one image), chunk-major; results land in y^T's own orientation (no transpose).
// pack(b, r0, r1, Mp, xv_b) fills row pairs [r0, r1) of image b's packed x^T (Mp words apart).
// One group of B images, all packed at once (bsr_xt_amx, below, splits a batch into such groups).
template <typename Pack>
void bsr_xt_amx_group(int64_t B, Pack&& pack, const int32_t* crow, const int32_t* col, const uint16_t* v,
                      const float* bias, uint16_t* y, int64_t M, int64_t K, int64_t N, int64_t bn, int64_t bk) {
  const int64_t rows = N / bn, nnzb = crow[rows], threads = at::get_num_threads();
  const int64_t Mp = (M + 31) / 32 * 32, tpi = Mp / 32, tiles = B * tpi, image = (K / 2) * Mp;
  at::Tensor xv_t = at::empty({B * image}, at::TensorOptions().dtype(at::kInt));
  uint32_t* xv = reinterpret_cast<uint32_t*>(xv_t.mutable_data_ptr<int32_t>());
  pack_used_pairs(B, pack, col, nnzb, K, bk, Mp, xv, image);
  const std::vector<int64_t> bounds = amx_chunks(crow, rows, bn, bk, K, tiles, threads);
  const int64_t chunks = int64_t(bounds.size()) - 1, tasks = tiles * chunks;
  const int64_t grain = B * M * nnzb * bn * bk < kMinWork ? tasks : 1;
  const int64_t group = std::max<int64_t>(1, 64 / bn);
  at::parallel_for(0, tasks, grain, [&](int64_t t0, int64_t t1) {
    const AmxTileScope tiles_configured(bk);
    std::vector<float> out(group * bn * 32);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t c = t / tiles, tile = t % tiles, b = tile / tpi, m0 = (tile % tpi) * 32;
      const int64_t mc = std::min<int64_t>(32, M - m0);
      for (int64_t r0 = bounds[c]; r0 < bounds[c + 1]; r0 += group) {
        const int64_t r1 = std::min(bounds[c + 1], r0 + group);
        amx_bsr_rows_t(xv + b * image + m0, Mp, crow, col, r0, r1, v, bn, bk, out.data());
        amx_store_bf16_t(out.data(), (r1 - r0) * bn, mc, bias ? bias + r0 * bn : nullptr,
                         y + b * N * M + r0 * bn * M + m0, M);
      }
    }
  });
}

template <typename Pack>
void bsr_xt_amx(int64_t B, Pack&& pack, const int32_t* crow, const int32_t* col, const uint16_t* v,
                const float* bias, uint16_t* y, int64_t M, int64_t K, int64_t N, int64_t bn, int64_t bk) {
  const int64_t Mp = (M + 31) / 32 * 32;
  in_pack_groups(B, (K / 2) * Mp * 4, pack, [&](int64_t g0, int64_t Bg, auto&& pack_g) {
    bsr_xt_amx_group(Bg, pack_g, crow, col, v, bias, y + g0 * N * M, M, K, N, bn, bk);
  });
}

// Whether bsr_mm_fast / bsr_xt_fast take the AMX path: bf16 activations and weights, blocks of 16-multiples, at
// least kAmxMinRows rows of x, and AMX available (CPU, OS grant, SPARSEKIT_CPU_ISA). Below, the SIMD GEMV (each
// block-row read once for all rows of x) wins: on the LLaMA-7B MLP at 50% / 90%, BSR 32, same-run medians, it is
// as fast or faster up to M = 4, 0-15% faster at M = 5, and from M = 6 AMX is ahead (10-40% at M = 7-8).
constexpr int64_t kAmxMinRows = 6;

bool use_amx(bool bf16, WKind wk, int64_t M, int64_t bn, int64_t bk) {
  return bf16 && wk == WKind::kBF16 && M >= kAmxMinRows && amx_block_ok(bn, bk) && amx_enabled();
}

// The M-panel task loop of bsr_mm_fast and bsr_mm_pairs: tasks = (M tile of MT rows, nonzero-balanced chunk of
// block-rows), M tile outermost so a thread's chunk reuses one panel; block-rows are computed `group` at a time
// (>= 64 contiguous outputs per row of y: one output per row for 1xk blocks would thrash cache and TLB), each by
// row(tile, r, out) into an fp32 panel [bn][MT], and the group's panels are transposed into y with the bias.
template <typename T, typename Row>
void panel_tasks(Isa isa, int64_t tiles, const std::vector<int64_t>& bounds, int64_t grain, int64_t MT, int64_t M,
                 int64_t N, int64_t bn, const float* bias, T* y, Row&& row) {
  const int64_t chunks = int64_t(bounds.size()) - 1, tasks = tiles * chunks;
  const int64_t group = std::max<int64_t>(1, (64 + bn - 1) / bn);
  at::parallel_for(0, tasks, grain, [&](int64_t t0, int64_t t1) {
    std::vector<float> out(group * bn * MT), scratch;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t tile = t / chunks, c = t % chunks, m0 = tile * MT, mc = std::min(MT, M - m0);
      for (int64_t r0 = bounds[c]; r0 < bounds[c + 1]; r0 += group) {
        const int64_t r1 = std::min(bounds[c + 1], r0 + group);
        for (int64_t r = r0; r < r1; ++r) row(tile, r, out.data() + (r - r0) * bn * MT);
        store_panel<T>(isa, out.data(), MT, (r1 - r0) * bn, mc, bias ? bias + r0 * bn : nullptr, y + m0 * N + r0 * bn,
                       N, scratch);
      }
    }
  });
}

// ------------------------------------------------------------------------- AVX512-BF16 pair panels
// Whether a product takes the pair panels (bf16_dot.h; bsr_mm_fast, bsr_xt_fast and the direct convolution, each
// from kPairMinRows rows / pixels): bf16 activations and weights, an even block_k,
// blocks of more than one row (1-row blocks keep the K-blocked fp32 kernel, whose panel walk they need), and
// vdpbf16ps available without AMX having been chosen (use_amx is asked first).
bool use_pair_panels(bool bf16, WKind wk, int64_t bn, int64_t bk) {
  return bf16 && wk == WKind::kBF16 && bk % 2 == 0 && bn > 1 && bf16_dot_enabled();
}

// From this many rows of x the pair panels beat the bf16 GEMV (which widens W and x to fp32 and walks a block-row
// once per row of x): measured on a Zen 5 EPYC, BERT-base MLP shapes, BSR 32, 50% / 90%, same-run medians, the
// GEMV is 1.3-2x faster at M = 1-2, and the pair panels 1.2-2.4x faster at M = 3-8.
constexpr int64_t kPairMinRows = 3;

// Vectors of 16 rows of x per pair panel (bsr_pair_panel_row takes 1, 2 or 4).
inline int pair_nv(int64_t M, int64_t bn) { return std::min(choose_nv(Isa::kAvx512, M, bn), 4); }

// y = x @ W^T (+ bias) for bfloat16 x and values on vdpbf16ps: x packed into pair panels [tiles][K/2][MT];
// tasks = (M tile, nonzero-balanced chunk of block-rows), M tile outermost, as in bsr_mm_fast's M-panel path.
void bsr_mm_pairs(const uint16_t* x, const int32_t* crow, const int32_t* col, const uint16_t* v, const float* bias,
                  c10::BFloat16* y, int64_t M, int64_t K, int64_t N, int64_t bn, int64_t bk) {
  const int64_t rows = N / bn, nnzb = crow[rows], threads = at::get_num_threads();
  const int nv = pair_nv(M, bn);
  const int64_t MT = int64_t(nv) * 16, tiles = (M + MT - 1) / MT, P = K / 2;
  at::Tensor xp_t = at::empty({tiles * P * MT}, at::TensorOptions().dtype(at::kInt));
  uint32_t* xp = reinterpret_cast<uint32_t*>(xp_t.mutable_data_ptr<int32_t>());
  at::parallel_for(0, tiles, grain_for(P * MT), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      pack_pair_panel(x + t * MT * K, K, std::min(MT, M - t * MT), K, MT, xp + t * P * MT);
    }
  });
  const int64_t want = (4 * threads + tiles - 1) / tiles;
  const std::vector<int64_t> bounds = balanced_chunks(crow, rows, want, bn * bk, bn);
  const int64_t grain = M * nnzb * bn * bk < kMinWork ? tiles * (int64_t(bounds.size()) - 1) : 1;
  panel_tasks(Isa::kAvx512, tiles, bounds, grain, MT, M, N, bn, bias, y, [&](int64_t tile, int64_t r, float* out) {
    bsr_pair_panel_row(nv, xp + tile * P * MT, MT, col, crow[r], crow[r + 1], v, bn, bk, out);
  });
}

// y^T [B, N, M] = W @ x^T [B, K, M] (+ bias[:, None]) for bfloat16 on vdpbf16ps, one group of images: each image's
// x^T packed as row pairs [K/2][Mp] (amx_pack_xt / amx_pack_conv words; Mp = M rounded up to the panel width and
// to 32) and read in place as pair panels Mp words apart; tasks = (MT columns of one image, nonzero-balanced chunk
// of block-rows), columns outermost; each block-row's fp32 panel [bn][MT] is stored straight into y^T.
// nv: pair_nv(M, bn); Mp: M rounded up to a multiple of the panel width nv * 16 and of 32 (bsr_xt_pairs).
template <typename Pack>
void bsr_xt_pairs_group(int64_t B, Pack&& pack, const int32_t* crow, const int32_t* col, const uint16_t* v,
                        const float* bias, c10::BFloat16* y, int64_t M, int64_t K, int64_t N, int64_t bn, int64_t bk,
                        int nv, int64_t Mp) {
  const int64_t rows = N / bn, nnzb = crow[rows], threads = at::get_num_threads();
  const int64_t MT = int64_t(nv) * 16;
  const int64_t tpi = (M + MT - 1) / MT, tiles = B * tpi, image = (K / 2) * Mp;
  at::Tensor xv_t = at::empty({B * image}, at::TensorOptions().dtype(at::kInt));
  uint32_t* xv = reinterpret_cast<uint32_t*>(xv_t.mutable_data_ptr<int32_t>());
  pack_used_pairs(B, pack, col, nnzb, K, bk, Mp, xv, image);
  const std::vector<int64_t> bounds = balanced_chunks(crow, rows, (4 * threads + tiles - 1) / tiles, bn * bk, bn);
  const int64_t chunks = int64_t(bounds.size()) - 1, tasks = tiles * chunks;
  const int64_t grain = B * M * nnzb * bn * bk < kMinWork ? tasks : 1;
  at::parallel_for(0, tasks, grain, [&](int64_t t0, int64_t t1) {
    std::vector<float> out(bn * MT);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t tile = t / chunks, c = t % chunks, b = tile / tpi, m0 = (tile % tpi) * MT;
      const int64_t mc = std::min(MT, M - m0);
      for (int64_t r = bounds[c]; r < bounds[c + 1]; ++r) {
        bsr_pair_panel_row(nv, xv + b * image + m0, Mp, col, crow[r], crow[r + 1], v, bn, bk, out.data());
        store_panel_xt<c10::BFloat16>(out.data(), MT, bn, mc, bias ? bias + r * bn : nullptr,
                                      y + b * N * M + r * bn * M + m0, M);
      }
    }
  });
}

template <typename Pack>
void bsr_xt_pairs(int64_t B, Pack&& pack, const int32_t* crow, const int32_t* col, const uint16_t* v,
                  const float* bias, c10::BFloat16* y, int64_t M, int64_t K, int64_t N, int64_t bn, int64_t bk) {
  const int nv = pair_nv(M, bn);
  const int64_t width = std::max<int64_t>(int64_t(nv) * 16, 32), Mp = (M + width - 1) / width * width;
  in_pack_groups(B, (K / 2) * Mp * 4, pack, [&](int64_t g0, int64_t Bg, auto&& pack_g) {
    bsr_xt_pairs_group(Bg, pack_g, crow, col, v, bias, y + g0 * N * M, M, K, N, bn, bk, nv, Mp);
  });
}

// ------------------------------------------------------------------------------- SIMD fast path
// y[M, N] = x[M, K] @ W^T (+ bias) for float32 / bfloat16 / float16 activations, fp32 accumulation, with
// the run-time selected micro-kernels of simd.h. W is given as raw BSR arrays so the backward (dx = dy @ W)
// can run the same code over the transposed blocks. v holds fp32 values or raw bf16 bits (wk).
//   bfloat16 with AMX (M >= kAmxMinRows) or AVX512-BF16 (M >= kPairMinRows): bsr_mm_amx / bsr_mm_pairs.
//   M small (2*M <= vector width): GEMV per (block-row, row of x), block-row outer: W read once from memory.
//   otherwise: x packed into fp32 panels [tiles][K][MT]; tasks = (M tile, nonzero-balanced chunk of
//   block-rows), M tile outermost so a thread's chunk reuses one panel; each block-row is computed as an
//   fp32 panel [bn][MT] and transposed into y with the bias.
template <typename T>
void bsr_mm_fast(const T* x, const int32_t* crow, const int32_t* col, const void* v, WKind wk, const T* bias, T* y,
                 int64_t M, int64_t K, int64_t N, int64_t bn, int64_t bk) {
  const Isa isa = active_isa();
  const int64_t rows = N / bn, nnzb = crow[rows];
  const int64_t threads = at::get_num_threads();
  const int W = vec_floats(isa);
  if (M == 0 || N == 0) return;
  if (use_amx(std::is_same_v<T, c10::BFloat16>, wk, M, bn, bk)) {
    const std::vector<float> bf = bias_f32(bias, N);
    bsr_mm_amx(reinterpret_cast<const uint16_t*>(x), crow, col, static_cast<const uint16_t*>(v),
               bias ? bf.data() : nullptr, reinterpret_cast<uint16_t*>(y), M, K, N, bn, bk);
    return;
  }
  if (M >= kPairMinRows && use_pair_panels(std::is_same_v<T, c10::BFloat16>, wk, bn, bk)) {
    const std::vector<float> bf = bias_f32(bias, N);
    bsr_mm_pairs(reinterpret_cast<const uint16_t*>(x), crow, col, static_cast<const uint16_t*>(v),
                 bias ? bf.data() : nullptr, reinterpret_cast<c10::BFloat16*>(y), M, K, N, bn, bk);
    return;
  }
  if (2 * M <= W) {
    const std::vector<int64_t> bounds = balanced_chunks(crow, rows, 4 * threads, bn * bk, bn);
    const int64_t chunks = int64_t(bounds.size()) - 1;
    std::vector<float> xf;
    const float* xr = as_f32(x, M * K, xf);
    const int64_t grain = M * nnzb * bn * bk < kMinWork ? chunks : 1;
    at::parallel_for(0, chunks, grain, [&](int64_t c0, int64_t c1) {
      std::vector<float> out(bn);
      for (int64_t c = c0; c < c1; ++c) {
        for (int64_t r = bounds[c]; r < bounds[c + 1]; ++r) {
          for (int64_t m = 0; m < M; ++m) {   // the block-row stays in cache (L1 / L2) for the other rows of x
            bsr_gemv_row(isa, xr + m * K, col, crow[r], crow[r + 1], v, wk, bn, bk, out.data());
            T* yr = y + m * N + r * bn;
            for (int64_t i = 0; i < bn; ++i) {
              yr[i] = static_cast<T>(out[i] + (bias ? static_cast<float>(bias[r * bn + i]) : 0.f));
            }
          }
        }
      }
    });
    return;
  }
  // The N-vectorized path transposes every stored block per call and streams those copies once per ~1 MiB of
  // rows of x: worth it only for many rows of a short K (measured, BSR 32 fp32: at M = 128 on LLaMA-7B shapes
  // the M-panel path below is 1.6-1.9x faster at 50%, 1.3-1.5x at 90%; at M = 512 on BERT shapes this one is up
  // to 1.2x faster at 90%).
  if (bn % W == 0 && (M >= 512 || (M >= 256 && K <= 1024))) {
    // Vectorized over N: every stored block transposed to fp32 [bk][bn] per call (O(nnzb * bn * bk), freed on
    // return); tasks = (chunk of ~1 MiB of rows of x, nonzero-balanced chunk of block-rows), rows of x outermost.
    at::Tensor wt_t = at::empty({nnzb * bn * bk}, at::TensorOptions().dtype(at::kFloat));
    float* wt = wt_t.mutable_data_ptr<float>();
    at::parallel_for(0, nnzb, grain_for(bn * bk), [&](int64_t p0, int64_t p1) {
      std::vector<float> wide;
      for (int64_t p = p0; p < p1; ++p) {
        const float* src;
        if (wk == WKind::kF32) {
          src = static_cast<const float*>(v) + p * bn * bk;
        } else {
          const uint16_t* raw = static_cast<const uint16_t*>(v) + p * bn * bk;
          wide.resize(bn * bk);
          for (int64_t e = 0; e < bn * bk; ++e) {
            const uint32_t u = uint32_t(raw[e]) << 16;
            std::memcpy(&wide[e], &u, sizeof(float));
          }
          src = wide.data();
        }
        transpose(isa, src, bk, bn, bk, nullptr, wt + p * bn * bk, bn);
      }
    });
    at::Tensor xf_t;
    const float* xf;
    if constexpr (std::is_same_v<T, float>) {
      xf = x;
    } else {
      xf_t = at::empty({M * K}, at::TensorOptions().dtype(at::kFloat));
      float* d = xf_t.mutable_data_ptr<float>();
      at::parallel_for(0, M, grain_for(K), [&](int64_t m0, int64_t m1) {
        for (int64_t i = m0 * K; i < m1 * K; ++i) d[i] = static_cast<float>(x[i]);
      });
      xf = d;
    }
    const std::vector<float> bf = bias_f32(bias, N);
    const int64_t mc_rows = std::clamp<int64_t>((int64_t(1) << 20) / std::max<int64_t>(1, K * 4), 24, M);
    const int64_t mchunks = (M + mc_rows - 1) / mc_rows;
    const std::vector<int64_t> bounds = balanced_chunks(crow, rows, (4 * threads + mchunks - 1) / mchunks, bn * bk, bn);
    const int64_t chunks = int64_t(bounds.size()) - 1, tasks = mchunks * chunks;
    const int64_t grain = M * nnzb * bn * bk < kMinWork ? tasks : 1;
    at::parallel_for(0, tasks, grain, [&](int64_t t0, int64_t t1) {
      std::vector<float> scratch;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t mi = t / chunks, c = t % chunks;
        const int64_t m0 = mi * M / mchunks, m1 = (mi + 1) * M / mchunks, mr = m1 - m0;
        for (int64_t r = bounds[c]; r < bounds[c + 1]; ++r) {
          const float* br = bias ? bf.data() + r * bn : nullptr;
          if constexpr (std::is_same_v<T, float>) {
            bsr_nvec_row(isa, xf + m0 * K, K, mr, col, crow[r], crow[r + 1], wt, bn, bk, br, y + m0 * N + r * bn, N);
          } else {
            scratch.resize(mr * bn);
            bsr_nvec_row(isa, xf + m0 * K, K, mr, col, crow[r], crow[r + 1], wt, bn, bk, br, scratch.data(), bn);
            for (int64_t j = 0; j < mr; ++j)
              for (int64_t i = 0; i < bn; ++i) y[(m0 + j) * N + r * bn + i] = static_cast<T>(scratch[j * bn + i]);
          }
        }
      }
    });
    return;
  }
  const int nv = choose_nv(isa, M, bn);
  const int64_t MT = int64_t(nv) * W, tiles = (M + MT - 1) / MT;
  at::Tensor xp_t = at::empty({tiles * K * MT}, at::TensorOptions().dtype(at::kFloat));
  float* xp = xp_t.mutable_data_ptr<float>();
  pack_panels<T>(isa, x, K, M, K, MT, xp);
  const std::vector<float> bf = bias_f32(bias, N);
  const int64_t want = (4 * threads + tiles - 1) / tiles;
  const std::vector<int64_t> bounds = balanced_chunks(crow, rows, want, bn * bk, bn);
  const int64_t chunks = int64_t(bounds.size()) - 1, tasks = tiles * chunks;
  const int64_t grain = M * nnzb * bn * bk < kMinWork ? tasks : 1;
  // 1-row blocks whose panel exceeds kKblockPanel bytes: K-blocked (bsr_kblock_rows), the block-rows of a task
  // kKblockRows at a time (their partial sums, kKblockRows * MT floats, stay in L2), each such group then stored
  // 8 rows of y at a time (the kernel prefetched those rows of y during its last chunk).
  constexpr int64_t kKblockPanel = 32 * 1024, kKblockRows = 256;
  const int64_t kc_rows = kKblockPanel / (MT * int64_t(sizeof(float)));
  if (bn == 1 && K > kc_rows) {
    const int64_t kcb = std::max<int64_t>(1, kc_rows / bk);
    at::parallel_for(0, tasks, grain, [&](int64_t t0, int64_t t1) {
      std::vector<float> buf(kKblockRows * MT + 16), scratch;
      float* out = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t(63));
      std::vector<int64_t> cur(kKblockRows);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t tile = t / chunks, c = t % chunks, m0 = tile * MT, mc = std::min(MT, M - m0);
        for (int64_t q0 = bounds[c]; q0 < bounds[c + 1]; q0 += kKblockRows) {
          const int64_t q1 = std::min(bounds[c + 1], q0 + kKblockRows);
          T* yq = y + m0 * N + q0;
          bsr_kblock_rows(isa, nv, xp + tile * K * MT, crow, col, q0, q1, v, wk, bk, K / bk, kcb, cur.data(), out,
                          reinterpret_cast<const char*>(yq), N * int64_t(sizeof(T)), (q1 - q0) * int64_t(sizeof(T)),
                          mc);
          store_panel_rows<T>(isa, out, MT, q1 - q0, mc, bias ? bf.data() + q0 : nullptr, yq, N, scratch);
        }
      }
    });
    return;
  }
  panel_tasks(isa, tiles, bounds, grain, MT, M, N, bn, bias ? bf.data() : nullptr, y,
              [&](int64_t tile, int64_t r, float* out) {
                bsr_panel_row(isa, nv, xp + tile * K * MT, MT, nullptr, col, crow[r], crow[r + 1], v, wk, bn, bk, out);
              });
}

// y^T [B, N, M] = W @ x^T [B, K, M] (+ bias[:, None]) for convolutions (x^T per image = im2col patches or
// NCHW pixels): M-panels are strided copies of x^T, each block-row's fp32 panel [bn][MT] is copied straight
// into y^T, or with `tiling` into a transposed conv's output (tap_tiling.h). Tasks = (tile of an image's M,
// nonzero-balanced chunk of block-rows), tile outermost.
template <typename T>
void bsr_xt_fast(const T* xt, int64_t B, const int32_t* crow, const int32_t* col, const void* v, WKind wk,
                 const T* bias, T* y, int64_t M, int64_t K, int64_t N, int64_t bn, int64_t bk,
                 const TapTiling* tiling = nullptr) {
  const Isa isa = active_isa();
  const int64_t rows = N / bn, nnzb = crow[rows], threads = at::get_num_threads();
  if (B == 0 || M == 0 || N == 0) return;
  const int W = vec_floats(isa);
  // (the AMX path stores plain y^T only: a tiled call that gets here runs the SIMD kernels, e.g. when
  // SPARSEKIT_CPU_ISA changed since bsr_mm_xt_tiled chose)
  if (tiling == nullptr && use_amx(std::is_same_v<T, c10::BFloat16>, wk, M, bn, bk)) {
    const std::vector<float> bf = bias_f32(bias, N);
    const uint16_t* xb = reinterpret_cast<const uint16_t*>(xt);
    auto pack = [&](int64_t b, int64_t r0, int64_t r1, int64_t Mp, uint32_t* xv) {
      amx_pack_xt(xb + b * K * M, M, 0, r0, r1, Mp, xv);
    };
    bsr_xt_amx(B, pack, crow, col, static_cast<const uint16_t*>(v), bias ? bf.data() : nullptr,
               reinterpret_cast<uint16_t*>(y), M, K, N, bn, bk);
    return;
  }
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (tiling == nullptr && M >= kPairMinRows && use_pair_panels(true, wk, bn, bk)) {
      const std::vector<float> bf = bias_f32(bias, N);
      const uint16_t* xb = reinterpret_cast<const uint16_t*>(xt);
      auto pack = [&](int64_t b, int64_t r0, int64_t r1, int64_t Mp, uint32_t* xv) {
        amx_pack_xt(xb + b * K * M, M, 0, r0, r1, Mp, xv);
      };
      bsr_xt_pairs(B, pack, crow, col, static_cast<const uint16_t*>(v), bias ? bf.data() : nullptr, y, M, K, N, bn,
                   bk);
      return;
    }
  }
  const int nv = choose_nv(isa, M, bn);
  const int64_t MT = int64_t(nv) * W, tpi = (M + MT - 1) / MT, tiles = B * tpi;
  // fp32 x^T is read in place (row k of a tile at xt + k * M): only the last, partial tile of each image is
  // packed (zero-padded to MT). Other dtypes are converted into packed panels.
  constexpr bool kInPlace = std::is_same_v<T, float>;
  const int64_t full = kInPlace ? M / MT : 0, packed_per_image = tpi - full;
  at::Tensor xp_t = at::empty({B * packed_per_image * K * MT}, at::TensorOptions().dtype(at::kFloat));
  float* xp = xp_t.mutable_data_ptr<float>();
  if (packed_per_image) pack_panels_xt<T>(xt, B, K, M, MT, xp, full * MT);
  const std::vector<float> bf = bias_f32(bias, N);
  const int64_t want = (4 * threads + tiles - 1) / tiles;
  const std::vector<int64_t> bounds = balanced_chunks(crow, rows, want, bn * bk, bn);
  const int64_t chunks = int64_t(bounds.size()) - 1, tasks = tiles * chunks;
  const int64_t grain = B * M * nnzb * bn * bk < kMinWork ? tasks : 1;
  at::parallel_for(0, tasks, grain, [&](int64_t t0, int64_t t1) {
    std::vector<float> out(bn * MT);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t tile = t / chunks, c = t % chunks;
      const int64_t b = tile / tpi, ti = tile % tpi, m0 = ti * MT, mc = std::min(MT, M - m0);
      const float* xtile;
      int64_t ldx = MT;
      if constexpr (kInPlace) {
        if (ti < full) {
          xtile = reinterpret_cast<const float*>(xt) + b * K * M + m0;
          ldx = M;
        } else {
          xtile = xp + (b * packed_per_image + ti - full) * K * MT;
        }
      } else {
        xtile = xp + tile * K * MT;
      }
      for (int64_t r = bounds[c]; r < bounds[c + 1]; ++r) {
        bsr_panel_row(isa, nv, xtile, ldx, nullptr, col, crow[r], crow[r + 1], v, wk, bn, bk, out.data());
        const float* br = bias ? bf.data() + r * bn : nullptr;
        if (tiling) {
          store_panel_tiled<T>(out.data(), MT, bn, mc, br, y + b * tiling->image, tiling->row_off.data() + r * bn,
                               tiling->col_off.data() + m0);
        } else {
          store_panel_xt<T>(out.data(), MT, bn, mc, br, y + b * N * M + r * bn * M + m0, M);
        }
      }
    }
  });
}

#define SPARSEKIT_DISPATCH_FAST(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// ------------------------------------------------------------------------------------------------ ops
at::Tensor bsr_mm(const at::Tensor& x_in, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                  const std::optional<at::Tensor>& bias_in, int64_t n) {
  const auto [bn, bk, bias] = check_bsr_mm_args("sparsekit::bsr_mm", x_in, "x", 2, crow, col, values, bias_in, n);
  const int64_t M = x_in.size(0), K = x_in.size(1);
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty({M, n}, x.options());
  if (use_fast(x.scalar_type())) {
    const auto [fv, wk] = fast_values(values);
    SPARSEKIT_DISPATCH_FAST(x.scalar_type(), "sparsekit_bsr_mm_fast", [&] {
      if constexpr (!std::is_same_v<scalar_t, double>) {
        bsr_mm_fast<scalar_t>(x.const_data_ptr<scalar_t>(), crow.const_data_ptr<int32_t>(),
                              col.const_data_ptr<int32_t>(), fv.const_data_ptr(), wk, bias_ptr<scalar_t>(bias),
                              y.mutable_data_ptr<scalar_t>(), M, K, n, bn, bk);
      }
    });
    return y;
  }
  const at::Tensor v = to_acc(values);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sparsekit_bsr_mm", [&] {
    using A = at::opmath_type<scalar_t>;
    with_packed_rows<scalar_t, A>(x, M, K, [&](auto mt, const A* xp) {
      bsr_mm_kernel<decltype(mt)::value, scalar_t, A>(xp, crow.const_data_ptr<int32_t>(), col.const_data_ptr<int32_t>(),
                                                      v.const_data_ptr<A>(), bias_ptr<scalar_t>(bias),
                                                      y.mutable_data_ptr<scalar_t>(), M, K, n, bn, bk);
    });
  });
  return y;
}

// y^T [B, n, M] = W @ x^T [B, K, M] (+ bias[:, None]): bsr_mm in the transposed (convolution) layout.
at::Tensor bsr_mm_xt(const at::Tensor& xt_in, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                     const std::optional<at::Tensor>& bias_in, int64_t n) {
  const auto [bn, bk, bias] =
      check_bsr_mm_args("sparsekit::bsr_mm_xt", xt_in, "xt", 3, crow, col, values, bias_in, n);
  const int64_t B = xt_in.size(0), K = xt_in.size(1), M = xt_in.size(2);
  if (!use_fast(xt_in.scalar_type())) {  // float64: the row-layout kernel on transposed copies
    const at::Tensor y = bsr_mm(xt_in.transpose(1, 2).reshape({B * M, K}), crow, col, values, bias_in, n);
    return y.reshape({B, M, n}).transpose(1, 2).contiguous();
  }
  const at::Tensor xt = xt_in.contiguous();
  at::Tensor y = at::empty({B, n, M}, xt.options());
  const auto [fv, wk] = fast_values(values);
  SPARSEKIT_DISPATCH_FAST(xt.scalar_type(), "sparsekit_bsr_mm_xt", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      bsr_xt_fast<scalar_t>(xt.const_data_ptr<scalar_t>(), B, crow.const_data_ptr<int32_t>(),
                            col.const_data_ptr<int32_t>(), fv.const_data_ptr(), wk, bias_ptr<scalar_t>(bias),
                            y.mutable_data_ptr<scalar_t>(), M, K, n, bn, bk);
    }
  });
  return y;
}

// bsr_mm_xt written straight into the output of a transposed conv whose taps tile it (tap_tiling.h): y [B, n /
// prod(kernel), *(sizes * kernel)]; float64 and AMX compute y^T and rearrange it.
at::Tensor bsr_mm_xt_tiled(const at::Tensor& xt_in, const at::Tensor& crow, const at::Tensor& col,
                           const at::Tensor& values, const std::optional<at::Tensor>& bias_in, int64_t n,
                           at::IntArrayRef sizes, at::IntArrayRef kernel) {
  constexpr const char* op = "sparsekit::bsr_mm_xt_tiled";
  const auto [bn, bk, bias] = check_bsr_mm_args(op, xt_in, "xt", 3, crow, col, values, bias_in, n);
  const TapTiling tiling = tap_tiling(op, xt_in, n, sizes, kernel);
  const int64_t B = xt_in.size(0), K = xt_in.size(1), M = xt_in.size(2);
  // float64 and the AMX path (bf16 values) store plain y^T: computed so, then rearranged
  const WKind stored = values.scalar_type() == at::kBFloat16 ? WKind::kBF16 : WKind::kF32;
  if (!use_fast(xt_in.scalar_type()) || use_amx(xt_in.scalar_type() == at::kBFloat16, stored, M, bn, bk)) {
    return tile_taps(bsr_mm_xt(xt_in, crow, col, values, bias_in, n), tiling, sizes, kernel);
  }
  const auto [fv, wk] = fast_values(values);
  const at::Tensor xt = xt_in.contiguous();
  at::Tensor y = at::empty(tiling.shape, xt.options());
  SPARSEKIT_DISPATCH_FAST(xt.scalar_type(), "sparsekit_bsr_mm_xt_tiled", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      bsr_xt_fast<scalar_t>(xt.const_data_ptr<scalar_t>(), B, crow.const_data_ptr<int32_t>(),
                            col.const_data_ptr<int32_t>(), fv.const_data_ptr(), wk, bias_ptr<scalar_t>(bias),
                            y.mutable_data_ptr<scalar_t>(), M, K, n, bn, bk, &tiling);
    }
  });
  return y;
}

// y [B, n, (Do,) Ho, Wo] = conv2d / conv3d(x [B, C, (D,) H, W], W [n, C*(kd*)kh*kw] BSR) (+ bias): conv_panels
// (panel.h), no im2col; op (named in errors) has nd spatial dims.
at::Tensor bsr_conv(const char* op, size_t nd, const at::Tensor& x_in, const at::Tensor& crow, const at::Tensor& col,
                    const at::Tensor& values, const std::optional<at::Tensor>& bias_in, at::IntArrayRef kernel_size,
                    at::IntArrayRef padding, at::IntArrayRef dilation, at::IntArrayRef stride) {
  check_tensor(op, values, "values", 3);
  check_index(op, crow, "crow_indices");
  check_index(op, col, "col_indices");
  TORCH_CHECK(crow.numel() >= 1, op, ": crow_indices must have N/block_n + 1 >= 1 entries, got 0");
  const ConvGeom g = checked_conv_geom(op, nd, x_in, values, kernel_size, padding, dilation, stride);
  const int64_t K = g.K();
  const int64_t bn = values.size(1), bk = values.size(2), n = (crow.numel() - 1) * bn;
  check_block(op, bn, bk);
  TORCH_CHECK(K % bk == 0, op, ": C*prod(kernel_size) (K=", K, ") must be a multiple of block_k=", bk,
              " (values.size(2))");
  check_blocks(op, crow, col, values, n / bn, K / bk);
  const at::Tensor bias = checked_bias(op, bias_in, n, x_in, "x");
  const std::vector<int64_t> y_shape = conv_out_shape(g, n, nd);
  // AMX packs each image's im2col matrix (K x outputs bf16) whole, and a tile of 32 outputs reads K/2 rows of it
  // a row apart: for 3-D convs past ~24 MiB per image the SIMD direct kernel wins (measured: AMX 2-3x faster at
  // 3-10 MiB, 1.2-1.4x slower at 41 MiB); strided 3-D convs stay on the SIMD direct kernel (the patch matrix
  // into AMX was 1.2-1.7x slower at 95%). 2-D convs take AMX at any size (measured faster up to 14 MiB).
  constexpr int64_t kAmxConv3dPackMax = int64_t(24) << 20;
  const bool amx = x_in.scalar_type() == at::kBFloat16 && use_amx(true, WKind::kBF16, g.outputs(), bn, bk) &&
                   (nd == 2 || (g.unit_stride() && K * ((g.outputs() + 31) / 32 * 32) * 2 <= kAmxConv3dPackMax));
  if ((amx && !g.unit_stride()) || !use_fast(x_in.scalar_type())) {
    // strided 2-D on AMX (amx_pack_conv reads stride-1 taps) and float64: im2col + the transposed-layout op
    const at::Tensor cols = conv_patches(x_in, kernel_size, padding, dilation, stride);
    return bsr_mm_xt(cols, crow, col, values, bias_in, n).reshape(y_shape);
  }
  if (amx) {
    // AMX: the implicit im2col matrix packed straight from the image into VNNI row pairs (amx_pack_conv)
    const at::Tensor x = x_in.contiguous();
    at::Tensor y = at::empty(y_shape, x.options());
    if (g.B == 0 || n == 0) return y;
    const AmxConv ag{g.C, g.D, g.H, g.W, g.kd, g.kh, g.kw, g.pd, g.ph, g.pw, g.dd, g.dh, g.dw, g.Do(), g.Ho(),
                     g.Wo()};
    const uint16_t* xb = reinterpret_cast<const uint16_t*>(x.const_data_ptr<at::BFloat16>());
    auto pack = [&](int64_t b, int64_t r0, int64_t r1, int64_t Mp, uint32_t* xv) {
      amx_pack_conv(xb + b * g.C * g.D * g.H * g.W, ag, r0, r1, Mp, xv);
    };
    const std::vector<float> bf = bias_vec(bias);
    bsr_xt_amx(g.B, pack, crow.const_data_ptr<int32_t>(), col.const_data_ptr<int32_t>(),
               static_cast<const uint16_t*>(values.const_data_ptr()), bf.empty() ? nullptr : bf.data(),
               reinterpret_cast<uint16_t*>(y.mutable_data_ptr<at::BFloat16>()), g.outputs(), K, n, bn, bk);
    return y;
  }
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty(y_shape, x.options());
  if (g.B == 0 || n == 0) return y;
  const auto [fv, wk] = fast_values(values);
  const Isa isa = active_isa();
  const int64_t threads = at::get_num_threads(), Mg = g.grid();
  const int64_t rows = n / bn;
  // bfloat16 on AVX512-BF16 (no AMX): pair panels packed per tile from the padded image (bf16_dot.h)
  const bool pairs = x.scalar_type() == at::kBFloat16 && Mg >= kPairMinRows && use_pair_panels(true, wk, bn, bk);
  const int nv = pairs ? pair_nv(Mg, bn) : choose_nv(isa, Mg, bn);
  const int64_t MT = int64_t(nv) * (pairs ? 16 : vec_floats(isa)), tiles = g.slices() * ((Mg + MT - 1) / MT);
  const int32_t* cr = crow.const_data_ptr<int32_t>();
  const int32_t* cc = col.const_data_ptr<int32_t>();
  const std::vector<int64_t> bounds = balanced_chunks(cr, rows, (4 * threads + tiles - 1) / tiles, bn * bk, bn);
  const void* v = fv.const_data_ptr();
  const std::vector<float> bf = bias_vec(bias);
  if (pairs) {
    const uint16_t* v16 = static_cast<const uint16_t*>(v);
    // at 90% block sparsity many block-columns are empty in every block-row: their pairs are not packed
    const std::vector<char> cols_used = used_block_columns(cc, cr[rows], K / bk);
    std::vector<char> used(K / 2);
    for (int64_t p = 0; p < K / 2; ++p) used[p] = cols_used[2 * p / bk];
    conv_panels<at::BFloat16, true>(x.const_data_ptr<at::BFloat16>(), g, n, MT, bounds, bn,
                                    bf.empty() ? nullptr : bf.data(), y.mutable_data_ptr<at::BFloat16>(),
                                    /*in_place=*/false,
                                    [&](const uint32_t* xt, const int64_t*, int64_t u0, int64_t u1, float* out) {
                                      for (int64_t r = u0; r < u1; ++r)
                                        bsr_pair_panel_row(nv, xt, MT, cc, cr[r], cr[r + 1], v16, bn, bk,
                                                           out + (r - u0) * bn * MT);
                                    }, &used);
    return y;
  }
  SPARSEKIT_DISPATCH_FAST(x.scalar_type(), "sparsekit_bsr_conv", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      conv_panels<scalar_t>(x.const_data_ptr<scalar_t>(), g, n, MT, bounds, bn, bf.empty() ? nullptr : bf.data(),
                            y.mutable_data_ptr<scalar_t>(), /*in_place=*/true,
                            [&](const float* xt, const int64_t* rowoff, int64_t u0, int64_t u1, float* out) {
                              for (int64_t r = u0; r < u1; ++r)
                                bsr_panel_row(isa, nv, xt, MT, rowoff, cc, cr[r], cr[r + 1], v, wk, bn, bk,
                                              out + (r - u0) * bn * MT);
                            });
    }
  });
  return y;
}

at::Tensor bsr_conv2d(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                      const std::optional<at::Tensor>& bias, at::IntArrayRef kernel_size, at::IntArrayRef padding,
                      at::IntArrayRef dilation, at::IntArrayRef stride) {
  return bsr_conv("sparsekit::bsr_conv2d", 2, x, crow, col, values, bias, kernel_size, padding, dilation, stride);
}

at::Tensor bsr_conv3d(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                      const std::optional<at::Tensor>& bias, at::IntArrayRef kernel_size, at::IntArrayRef padding,
                      at::IntArrayRef dilation, at::IntArrayRef stride) {
  return bsr_conv("sparsekit::bsr_conv3d", 3, x, crow, col, values, bias, kernel_size, padding, dilation, stride);
}


at::Tensor bsr_mm_t(const at::Tensor& dy_in, const at::Tensor& crow, const at::Tensor& col,
                    const at::Tensor& values, int64_t k) {
  constexpr const char* op = "sparsekit::bsr_mm_t";
  const auto [bn, bk] = check_bsr_operands(op, dy_in, "dy", 2, crow, col, values);
  const int64_t M = dy_in.size(0), N = dy_in.size(1);
  TORCH_CHECK(N % bn == 0, op, ": dy.size(1) (N=", N, ") must be a multiple of block_n=", bn, " (values.size(1))");
  TORCH_CHECK(k >= 0 && k % bk == 0, op, ": k (", k, ") must be a non-negative multiple of block_k=", bk);
  check_blocks(op, crow, col, values, N / bn, k / bk);
  const at::Tensor dy = dy_in.contiguous();
  at::Tensor dx = at::empty({M, k}, dy.options());
  if (use_fast(dy.scalar_type())) {
    // dx = dy @ W is the forward product with W^T: a BSR of [K/bk, N/bn] block-rows of transposed blocks
    // [bk, bn], built per call (O(nnzb * bn * bk), small next to the O(M * nnzb * bn * bk) product).
    const int64_t rows = N / bn, cols = k / bk;
    const int32_t* cr = crow.const_data_ptr<int32_t>();
    const BlockColumns bc = block_columns(cr, col.const_data_ptr<int32_t>(), rows, cols);
    const int64_t nnzb = col.numel();
    std::vector<int32_t> tptr(cols + 1), tcol(nnzb);
    for (int64_t c = 0; c <= cols; ++c) tptr[c] = static_cast<int32_t>(bc.ptr[c]);
    for (int64_t p = 0; p < nnzb; ++p) tcol[p] = static_cast<int32_t>(bc.row[p]);
    // bf16 values stay bf16 (bit copies, so the AMX path can take them); others go to fp32
    const bool bf16 = values.scalar_type() == at::kBFloat16;
    const at::Tensor vf = bf16 ? values : values.to(at::kFloat).contiguous();
    const at::Tensor tval = at::empty({nnzb * bn * bk}, vf.options());
    auto transpose_blocks = [&](auto* vt, const auto* vs) {
      at::parallel_for(0, nnzb, grain_for(bn * bk), [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) {
          const auto* src = vs + bc.block[p] * bn * bk;
          auto* dst = vt + p * bn * bk;
          for (int64_t i = 0; i < bn; ++i)
            for (int64_t kk = 0; kk < bk; ++kk) dst[kk * bn + i] = src[i * bk + kk];
        }
      });
    };
    if (bf16) {
      transpose_blocks(static_cast<uint16_t*>(tval.mutable_data_ptr()),
                       static_cast<const uint16_t*>(vf.const_data_ptr()));
    } else {
      transpose_blocks(tval.mutable_data_ptr<float>(), vf.const_data_ptr<float>());
    }
    SPARSEKIT_DISPATCH_FAST(dy.scalar_type(), "sparsekit_bsr_mm_t_fast", [&] {
      if constexpr (!std::is_same_v<scalar_t, double>) {
        bsr_mm_fast<scalar_t>(dy.const_data_ptr<scalar_t>(), tptr.data(), tcol.data(), tval.const_data_ptr(),
                              bf16 ? WKind::kBF16 : WKind::kF32, nullptr, dx.mutable_data_ptr<scalar_t>(), M, N, k,
                              bk, bn);
      }
    });
    return dx;
  }
  const at::Tensor v = to_acc(values);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "sparsekit_bsr_mm_t", [&] {
    using A = at::opmath_type<scalar_t>;
    with_packed_rows<scalar_t, A>(dy, M, N, [&](auto mt, const A* dyp) {
      bsr_mm_t_kernel<decltype(mt)::value, scalar_t, A>(dyp, crow.const_data_ptr<int32_t>(),
                                                        col.const_data_ptr<int32_t>(), v.const_data_ptr<A>(),
                                                        dx.mutable_data_ptr<scalar_t>(), M, k, N, bn, bk);
    });
  });
  return dx;
}

// bsr_sddmm for bfloat16 on AMX tiles: dy^T as [N, Mp] bf16 slabs (A tiles in place), x zero-padded to Mp rows
// and packed as VNNI row pairs [Mp/2, Kp] (B tiles), per block an fp32 [bn, bk] result rounded into out.
void bsr_sddmm_amx(const at::Tensor& dy, const at::Tensor& x, const int32_t* crow, const int32_t* col,
                   at::Tensor& out, int64_t bn, int64_t bk) {
  const int64_t M = dy.size(0), N = dy.size(1), K = x.size(1), rows = N / bn, nnzb = crow[rows];
  const int64_t Mp = (M + 31) / 32 * 32, Kp = (K + 31) / 32 * 32;
  const auto bf = at::TensorOptions().dtype(at::kBFloat16);
  at::Tensor dyT = at::empty({N, Mp}, bf), xpad = at::empty({Mp, K}, bf);
  if (Mp > M) {  // zero only the padding
    dyT.narrow(1, M, Mp - M).zero_();
    xpad.narrow(0, M, Mp - M).zero_();
  }
  xpad.narrow(0, 0, M).copy_(x);
  // ATen's transposing copy runs on one thread: split it over row ranges of dy^T
  at::parallel_for(0, N, 256, [&](int64_t n0, int64_t n1) {
    dyT.narrow(0, n0, n1 - n0).narrow(1, 0, M).copy_(dy.narrow(1, n0, n1 - n0).t());
  });
  at::Tensor xv_t = at::empty({Mp / 2 * Kp}, at::TensorOptions().dtype(at::kInt));
  uint32_t* xv = reinterpret_cast<uint32_t*>(xv_t.mutable_data_ptr<int32_t>());
  const uint16_t* xb = reinterpret_cast<const uint16_t*>(xpad.const_data_ptr<at::BFloat16>());
  at::parallel_for(0, Mp / 2, grain_for(Kp), [&](int64_t r0, int64_t r1) { amx_pack_xt(xb, K, 0, r0, r1, Kp, xv); });
  const uint16_t* dt = reinterpret_cast<const uint16_t*>(dyT.const_data_ptr<at::BFloat16>());
  uint16_t* o = reinterpret_cast<uint16_t*>(out.mutable_data_ptr<at::BFloat16>());
  const std::vector<int64_t> row_of = block_rows(crow, rows);
  at::parallel_for(0, nnzb, grain_for(Mp * bn * bk), [&](int64_t b0, int64_t b1) {
    const AmxTileScope tiles_configured(32);
    std::vector<float> block(bn * bk);
    for (int64_t b = b0; b < b1; ++b) {
      amx_sddmm_block(dt + row_of[b] * bn * Mp, Mp, xv + int64_t(col[b]) * bk, Kp, Mp, bn, bk, block.data());
      amx_store_bf16(block.data(), bk, bk, bn, nullptr, o + b * bn * bk, bk);
    }
  });
}

// dW_b = dy[:, rows of b]^T @ x[:, columns of b] for every stored block b, on the SIMD micro-kernel of the
// forward (bsr_panel_row) with M as the contraction: the "block" is the [bn, M] slab of dy^T (fp32, or bf16 bits),
// the "panel" x itself read in place (fp32; other dtypes converted once), row m at x + m * K + col * bk, the
// vectors across kk. bk must be a multiple of the vector width (split into panels of at most 8 vectors).
// isa: the one read by the caller to choose this path (read once: bk was checked against its vector width)
void bsr_sddmm_fast(Isa isa, const at::Tensor& dy, const at::Tensor& x_in, const int32_t* crow, const int32_t* col,
                    at::Tensor& out, int64_t bn, int64_t bk) {
  const int W = vec_floats(isa);
  const int64_t M = dy.size(0), N = dy.size(1), K = x_in.size(1), rows = N / bn, nnzb = crow[rows];
  if (nnzb == 0) return;
  if (M == 0) {
    out.zero_();
    return;
  }
  const bool bf16 = dy.scalar_type() == at::kBFloat16;
  const at::Tensor dyT = (bf16 ? dy.t() : dy.t().to(at::kFloat)).contiguous();  // [N, M]
  const at::Tensor x = x_in.to(at::kFloat).contiguous();                        // [M, K] (no copy for fp32)
  const float* xf = x.const_data_ptr<float>();
  const char* dt = static_cast<const char*>(dyT.const_data_ptr());
  const int64_t dsz = dyT.element_size();
  const WKind wk = bf16 ? WKind::kBF16 : WKind::kF32;
  const std::vector<int64_t> row_of = block_rows(crow, rows);
  const bool f32 = out.scalar_type() == at::kFloat;
  at::parallel_for(0, nnzb, grain_for(M * bn * bk), [&](int64_t b0, int64_t b1) {
    std::vector<float> panel(bn * 8 * W), block(f32 ? 0 : bn * bk);
    const int32_t zero_col = 0;
    for (int64_t b = b0; b < b1; ++b) {
      const void* slab = dt + row_of[b] * bn * M * dsz;
      float* dst = f32 ? out.mutable_data_ptr<float>() + b * bn * bk : block.data();
      for (int64_t k0 = 0; k0 < bk;) {  // panels of nv vectors, nv a power of two <= 8
        int nv = 8;
        while (nv > 1 && nv * W > bk - k0) nv /= 2;   // (bk is a multiple of W: one vector always fits)
        const int64_t mt = int64_t(nv) * W;
        bsr_panel_row(isa, nv, xf + int64_t(col[b]) * bk + k0, K, nullptr, &zero_col, 0, 1, slab, wk, bn, M,
                      panel.data());
        for (int64_t i = 0; i < bn; ++i) std::memcpy(dst + i * bk + k0, panel.data() + i * mt, mt * sizeof(float));
        k0 += mt;
      }
      if (!f32) {
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "sparsekit_bsr_sddmm_store", [&] {
          scalar_t* o = out.mutable_data_ptr<scalar_t>() + b * bn * bk;
          for (int64_t e = 0; e < bn * bk; ++e) o[e] = static_cast<scalar_t>(block[e]);
        });
      }
    }
  });
}

at::Tensor bsr_sddmm(const at::Tensor& dy_in, const at::Tensor& x_in, const at::Tensor& crow, const at::Tensor& col,
                     int64_t block_n, int64_t block_k) {
  constexpr const char* op = "sparsekit::bsr_sddmm";
  check_sddmm_operands(op, dy_in, x_in);
  check_index(op, crow, "crow_indices");
  check_index(op, col, "col_indices");
  check_block(op, block_n, block_k);
  const int64_t M = dy_in.size(0), N = dy_in.size(1), K = x_in.size(1);
  check_sddmm_rows(op, dy_in, x_in);
  TORCH_CHECK(N % block_n == 0, op, ": dy.size(1) (N=", N, ") must be a multiple of block_n=", block_n);
  TORCH_CHECK(K % block_k == 0, op, ": x.size(1) (K=", K, ") must be a multiple of block_k=", block_k);
  check_structure(op, crow, col, N / block_n, K / block_k);
  at::Tensor out = at::empty({col.numel(), block_n, block_k}, dy_in.options());
  if (dy_in.scalar_type() == at::kBFloat16 && amx_block_ok(block_n, block_k) && amx_enabled() && col.numel() > 0) {
    bsr_sddmm_amx(dy_in, x_in, crow.const_data_ptr<int32_t>(), col.const_data_ptr<int32_t>(), out, block_n, block_k);
    return out;
  }
  const Isa isa = active_isa();
  if (use_fast(dy_in.scalar_type()) && block_k % vec_floats(isa) == 0) {
    bsr_sddmm_fast(isa, dy_in, x_in, crow.const_data_ptr<int32_t>(), col.const_data_ptr<int32_t>(), out, block_n,
                   block_k);
    return out;
  }
  const at::Tensor dyT = to_acc(dy_in.t()).contiguous(), xT = to_acc(x_in.t()).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy_in.scalar_type(), "sparsekit_bsr_sddmm", [&] {
    using A = at::opmath_type<scalar_t>;
    bsr_sddmm_kernel<scalar_t, A>(dyT.const_data_ptr<A>(), xT.const_data_ptr<A>(), crow.const_data_ptr<int32_t>(),
                                  col.const_data_ptr<int32_t>(), out.mutable_data_ptr<scalar_t>(), M, N, block_n,
                                  block_k);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekit, CPU, m) {
  m.impl("bsr_mm", &bsr_mm);
  m.impl("bsr_mm_t", &bsr_mm_t);
  m.impl("bsr_mm_xt", &bsr_mm_xt);
  m.impl("bsr_mm_xt_tiled", &bsr_mm_xt_tiled);
  m.impl("bsr_conv2d", &bsr_conv2d);
  m.impl("bsr_conv3d", &bsr_conv3d);
  m.impl("bsr_sddmm", &bsr_sddmm);
}
