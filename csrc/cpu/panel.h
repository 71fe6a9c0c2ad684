// Packing activations into fp32 M-panels and splitting block-rows into nonzero-balanced chunks: the glue
// between the ops (bsr_gemm.cpp, csr_spmm.cpp) and the SIMD micro-kernels (simd.h). CPU-only header.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/im2col.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "simd.h"

namespace sparsekit::cpu {

// dst[t][c][j] = float(src[(t*MT + j) * ld + c]) for c < C, zero for rows past M: a transpose per tile
// (8x8 register transposes for fp32; 16-bit inputs are widened row by row first), 32 columns at a time, so
// that the panel rows being written (32 x MT floats) stay in L1 until they are whole.
template <typename T>
void pack_panels(Isa isa, const T* src, int64_t ld, int64_t M, int64_t C, int64_t MT, float* dst) {
  const int64_t tiles = (M + MT - 1) / MT;
  at::parallel_for(0, tiles, grain_for(C * MT), [&](int64_t t0, int64_t t1) {
    std::vector<float> wide;
    if constexpr (!std::is_same_v<T, float>) wide.resize(MT * C);
    for (int64_t t = t0; t < t1; ++t) {
      float* d = dst + t * C * MT;
      const int64_t m0 = t * MT, mc = std::min(MT, M - m0);
      const float* s;
      int64_t lds;
      if constexpr (std::is_same_v<T, float>) {
        s = src + m0 * ld;
        lds = ld;
      } else {
        for (int64_t j = 0; j < mc; ++j)
          for (int64_t c = 0; c < C; ++c) wide[j * C + c] = static_cast<float>(src[(m0 + j) * ld + c]);
        s = wide.data();
        lds = C;
      }
      for (int64_t c0 = 0; c0 < C; c0 += 32) {
        transpose(isa, s + c0, lds, mc, std::min<int64_t>(32, C - c0), nullptr, d + c0 * MT, MT);
      }
      if (mc < MT) {
        for (int64_t c = 0; c < C; ++c) std::fill(d + c * MT + mc, d + (c + 1) * MT, 0.f);
      }
    }
  });
}

// y rows [m0, m0 + mc), columns [n0, n0 + cols) = transpose of the fp32 panel out[cols][MT] (+ bias[n0:]).
template <typename T>
void store_panel(Isa isa, const float* out, int64_t MT, int64_t cols, int64_t mc, const float* bias, T* y,
                 int64_t ldy, std::vector<float>& scratch) {
  if constexpr (std::is_same_v<T, float>) {
    transpose(isa, out, MT, cols, mc, bias, y, ldy);
  } else {
    scratch.resize(mc * cols);
    transpose(isa, out, MT, cols, mc, bias, scratch.data(), cols);
    for (int64_t j = 0; j < mc; ++j)
      for (int64_t i = 0; i < cols; ++i) y[j * ldy + i] = static_cast<T>(scratch[j * cols + i]);
  }
}

// store_panel, 8 rows of y at a time: each row of y gets its `cols` outputs as one contiguous run (one page
// touched per row per pass; store_panel walks the columns 8 at a time down all mc rows).
template <typename T>
void store_panel_rows(Isa isa, const float* out, int64_t MT, int64_t cols, int64_t mc, const float* bias, T* y,
                      int64_t ldy, std::vector<float>& scratch) {
  for (int64_t j0 = 0; j0 < mc; j0 += 8) {
    const int64_t jc = std::min<int64_t>(8, mc - j0);
    if constexpr (std::is_same_v<T, float>) {
      transpose(isa, out + j0, MT, cols, jc, bias, y + j0 * ldy, ldy);
    } else {
      scratch.resize(8 * cols);
      transpose(isa, out + j0, MT, cols, jc, bias, scratch.data(), cols);
      for (int64_t j = 0; j < jc; ++j)
        for (int64_t i = 0; i < cols; ++i) y[(j0 + j) * ldy + i] = static_cast<T>(scratch[j * cols + i]);
    }
  }
}

// The x^T layout (convolutions: per image, im2col patches or NCHW pixels are already [C, M]): src is
// [B][C][M]; dst[t][c][j] = float(src[b][c][m0 + j]) for the ceil((M - from)/MT) tiles of columns [from, M) of
// each image b (tile t = b * tiles_per_image + (m0 - from) / MT), zero past M. A strided copy, no transpose.
template <typename T>
void pack_panels_xt(const T* src, int64_t B, int64_t C, int64_t M, int64_t MT, float* dst, int64_t from = 0) {
  const int64_t tpi = (M - from + MT - 1) / MT, tiles = B * tpi;
  at::parallel_for(0, tiles, grain_for(C * MT), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / tpi, m0 = from + (t % tpi) * MT, mc = std::min(MT, M - m0);
      const T* s = src + b * C * M + m0;
      float* d = dst + t * C * MT;
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t j = 0; j < mc; ++j) d[c * MT + j] = static_cast<float>(s[c * M + j]);
        for (int64_t j = mc; j < MT; ++j) d[c * MT + j] = 0.f;
      }
    }
  });
}

// y^T rows [0, rows) (output channels), columns [0, mc) = the fp32 panel out[rows][MT] (+ bias[i] per row).
template <typename T>
void store_panel_xt(const float* out, int64_t MT, int64_t rows, int64_t mc, const float* bias, T* y, int64_t ldy) {
  for (int64_t i = 0; i < rows; ++i) {
    const float bv = bias ? bias[i] : 0.f;
    const float* o = out + i * MT;
    T* yr = y + i * ldy;
    for (int64_t j = 0; j < mc; ++j) yr[j] = static_cast<T>(o[j] + bv);
  }
}

// Direct convolution over M-panels, no im2col tensor, in 2-D and 3-D (2-D: D = kd = 1, pd = 0, dd = sd = 1):
// x [B, C, (D,) H, W] is copied once into a zero-padded fp32 image split into its stride phases,
// xpad [B][C][sd][sh][sw][Dq][Hq][Wq] (+ slack; Dq = ceil(Dp / sd), Hq = ceil(Hp / sh), Wq = ceil(Wp / sw)): padded
// voxel (z, i, j) goes to phase (z % sd, i % sh, j % sw) at (z / sd, i / sh, j / sw). A strided convolution is then
// a stride-1 one over the phases (tap ky * dh = sh * a + ry reads phase row ry, shifted a rows). Each output slice
// (image b, output depth od) is computed on an Ho x Wq grid (Wq - Wo wasted columns per row), where weight column
// k = (c, kz, ky, kx) of output m reads xpad[b] at od * Hq * Wq + off[k] + m: every panel row is one contiguous run
// of MT floats, for any stride (with stride 1 the phases are the padded image itself). Tasks = ((slice, tile),
// chunk of `bounds`). in_place: the kernel reads those runs straight from xpad (compute gets the tile's base and
// the row offsets); otherwise the panel is packed per task in a thread-local buffer (L2-resident, no per-call
// image-sized panel tensor) and compute gets it with rowoff = nullptr (rows MT apart). compute(xt, rowoff, u0, u1,
// out) fills out[(u - u0) * unit + i][MT] for the units (block-rows / rows) [u0, u1). kPairs (bfloat16, not in
// place): the per-task panel holds K/2 rows of bf16 pairs (bf16_dot.h), which compute gets as a const uint32_t*;
// used_pairs (K/2 flags, may be null) leaves the rows no block reads unpacked.
struct ConvGeom {
  int64_t B, C, D, H, W, kd, kh, kw, pd, ph, pw, dd, dh, dw, sd, sh, sw;
  int64_t Dp() const { return D + 2 * pd; }
  int64_t Hp() const { return H + 2 * ph; }
  int64_t Wp() const { return W + 2 * pw; }
  int64_t Dq() const { return (Dp() + sd - 1) / sd; }  // depth of one stride phase
  int64_t Hq() const { return (Hp() + sh - 1) / sh; }  // rows of one stride phase
  int64_t Wq() const { return (Wp() + sw - 1) / sw; }
  int64_t Do() const { return (Dp() - (kd - 1) * dd - 1) / sd + 1; }
  int64_t Ho() const { return (Hp() - (kh - 1) * dh - 1) / sh + 1; }
  int64_t Wo() const { return (Wp() - (kw - 1) * dw - 1) / sw + 1; }
  int64_t K() const { return C * kd * kh * kw; }
  int64_t grid() const { return Ho() * Wq(); }          // computed outputs per slice (image, output depth)
  int64_t slices() const { return B * Do(); }
  int64_t outputs() const { return Do() * Ho() * Wo(); }  // per image and output channel
  bool unit_stride() const { return sd == 1 && sh == 1 && sw == 1; }
};

// Validates a conv call's x [B, C, *spatial], values and kernel_size / padding / dilation / stride (one entry per
// spatial dim: nd = 2 or 3; op named in the errors) and returns its geometry; shared by the BSR and CSR conv ops.
inline ConvGeom checked_conv_geom(const char* op, size_t nd, const at::Tensor& x, const at::Tensor& values,
                                  at::IntArrayRef kernel_size, at::IntArrayRef padding, at::IntArrayRef dilation,
                                  at::IntArrayRef stride) {
  TORCH_CHECK(kernel_size.size() == nd && padding.size() == nd && dilation.size() == nd && stride.size() == nd, op,
              ": kernel_size, padding, dilation and stride must have ", nd, " entries each");
  check_tensor(op, x, "x", int64_t(nd) + 2);
  check_floating(op, x, "x");
  check_same_dtype(op, values, "values", x, "x");
  TORCH_CHECK(values.is_contiguous(), op, ": values must be contiguous");
  constexpr int64_t kMax = int64_t(1) << 31;  // keeps the geometry's sums and products below 2^63
  for (size_t d = 0; d < nd; ++d) {
    TORCH_CHECK(kernel_size[d] >= 1 && dilation[d] >= 1 && stride[d] >= 1 && padding[d] >= 0, op,
                ": kernel_size, dilation and stride must be >= 1 and padding >= 0, got ", kernel_size, ", ", padding,
                ", ", dilation, ", ", stride);
    TORCH_CHECK(kernel_size[d] < kMax && dilation[d] < kMax && stride[d] < kMax && padding[d] < kMax, op,
                ": kernel_size, padding, dilation and stride must be < 2^31, got ", kernel_size, ", ", padding, ", ",
                dilation, ", ", stride);
    TORCH_CHECK(x.size(2 + d) + 2 * padding[d] >= (kernel_size[d] - 1) * dilation[d] + 1, op,
                ": output would be empty (input ", x.sizes().slice(2), ", kernel ", kernel_size, ", padding ",
                padding, ", dilation ", dilation, ")");
  }
  const size_t o = nd - 2;  // index of the H entry
  auto depth = [&](at::IntArrayRef a, int64_t unit) { return nd == 3 ? a[0] : unit; };
  const ConvGeom g{x.size(0), x.size(1), nd == 3 ? x.size(2) : 1, x.size(2 + o), x.size(3 + o),
                   depth(kernel_size, 1), kernel_size[o], kernel_size[o + 1], depth(padding, 0), padding[o],
                   padding[o + 1], depth(dilation, 1), dilation[o], dilation[o + 1], depth(stride, 1), stride[o],
                   stride[o + 1]};
  // the padded image conv_panels copies (B * C * sd*sh*sw * Dq*Hq*Wq floats) must be addressable: a huge padding
  // with a huge stride gives a small output but would overflow its size
  int64_t bytes = 1;
  bool overflow = false;
  for (int64_t f : {g.B, g.C, g.sd * g.Dq(), g.sh * g.Hq(), g.sw * g.Wq(), int64_t(sizeof(float))})
    overflow |= __builtin_mul_overflow(bytes, f, &bytes);
  TORCH_CHECK(!overflow, op, ": the padded input (padding ", padding, ", stride ", stride,
              ") is too large to address");
  return g;
}

// y's shape for a conv of geometry g with n output channels: [B, n, (Do,) Ho, Wo].
inline std::vector<int64_t> conv_out_shape(const ConvGeom& g, int64_t n, size_t nd) {
  if (nd == 3) return {g.B, n, g.Do(), g.Ho(), g.Wo()};
  return {g.B, n, g.Ho(), g.Wo()};
}

// The im2col patch matrix [B, C * prod(kernel), prod(out)] of a 2-D or 3-D convolution, which the *_mm_xt ops
// take: the fallback of the conv ops where conv_panels does not run (float64; strided bf16 convs on AMX).
inline at::Tensor conv_patches(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef padding,
                               at::IntArrayRef dilation, at::IntArrayRef stride) {
  const int64_t nd = int64_t(kernel_size.size());
  if (nd == 2) return at::im2col(x, kernel_size, dilation, padding, stride);
  std::vector<int64_t> pad;  // constant_pad_nd lists the last dim first
  for (int64_t d = nd - 1; d >= 0; --d) pad.insert(pad.end(), {padding[d], padding[d]});
  at::Tensor v = at::constant_pad_nd(x, pad, 0);
  for (int64_t d = 0; d < nd; ++d) v = v.unfold(2 + d, dilation[d] * (kernel_size[d] - 1) + 1, stride[d]);
  for (int64_t d = 0; d < nd; ++d) v = v.slice(2 + nd + d, 0, std::nullopt, dilation[d]);  // the dilated taps
  std::vector<int64_t> perm{0, 1};  // [B, C, *out, *kernel] -> [B, C, *kernel, *out]
  for (int64_t d = 0; d < nd; ++d) perm.push_back(2 + nd + d);
  for (int64_t d = 0; d < nd; ++d) perm.push_back(2 + d);
  int64_t taps = 1, outs = 1;
  for (int64_t d = 0; d < nd; ++d) {
    taps *= kernel_size[d];
    outs *= v.size(2 + d);
  }
  return v.permute(perm).reshape({x.size(0), x.size(1) * taps, outs});
}

// Scratch for conv_panels' phase image: the calling thread's grow-only buffer, reused across calls (a fresh
// image-sized allocation pays a page fault per 4 KiB page on every call: measured, up to half the time of a
// 90%-sparse conv on this VM). Requests above kScratchKeep floats (256 MiB: batch 8 of a
// 64-channel 16x56x56 video clip fits) get a one-off buffer in `once`, freed
// with it, so a thread keeps at most that much between calls.
inline float* conv_scratch(size_t floats, std::unique_ptr<float[]>& once) {
  constexpr size_t kScratchKeep = size_t(64) << 20;
  if (floats > kScratchKeep) {
    once.reset(new float[floats]);
    return once.get();
  }
  thread_local std::unique_ptr<float[]> buf;
  thread_local size_t capacity = 0;
  if (floats > capacity) {
    buf.reset();  // before the new allocation (the two never coexist); if it throws, nothing is kept
    capacity = 0;
    buf.reset(new float[floats]);
    capacity = floats;
  }
  return buf.get();
}

template <typename T, bool kPairs = false, typename F>
void conv_panels(const T* x, const ConvGeom& g, int64_t N, int64_t MT, const std::vector<int64_t>& bounds,
                 int64_t unit, const float* bias, T* y, bool in_place, const F& compute,
                 const std::vector<char>* used_pairs = nullptr) {
  static_assert(!kPairs || std::is_same_v<T, c10::BFloat16>, "conv_panels: pair panels hold bfloat16 pairs");
  const int64_t Dq = g.Dq(), Hq = g.Hq(), Wq = g.Wq(), Do = g.Do(), Ho = g.Ho(), Wo = g.Wo(), K = g.K();
  const int64_t plane = Dq * Hq * Wq, phases = g.sd * g.sh * g.sw;
  const int64_t Mg = g.grid(), tpi = (Mg + MT - 1) / MT, tiles = g.slices() * tpi, img = g.C * phases * plane;
  const int64_t slack = MT + (g.kw - 1) * g.dw / g.sw + 1;
  // reused scratch, not value-initialised (a serial memset of an image-sized buffer costs as much as the copy):
  // each (image, channel) slab is zeroed (padding, phase remainders) by the thread that fills it, while in cache
  std::unique_ptr<float[]> once;
  float* const xpad = conv_scratch(g.B * img + slack, once);
  std::fill(xpad + g.B * img, xpad + g.B * img + slack, 0.f);
  at::parallel_for(0, g.B * g.C, grain_for(phases * plane), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      float* d = xpad + p * phases * plane;
      std::fill(d, d + phases * plane, 0.f);
      for (int64_t z = 0; z < g.D; ++z) {
        const int64_t pz = z + g.pd;
        for (int64_t i = 0; i < g.H; ++i) {
          const int64_t pi = i + g.ph;
          float* drow = d + ((pz % g.sd) * g.sh + pi % g.sh) * g.sw * plane + ((pz / g.sd) * Hq + pi / g.sh) * Wq;
          const T* srow = x + ((p * g.D + z) * g.H + i) * g.W;
          if (g.sw == 1) {  // one phase: a plain (vectorised) row copy
            for (int64_t j = 0; j < g.W; ++j) drow[g.pw + j] = static_cast<float>(srow[j]);
            continue;
          }
          // input column j = t * sw + r lands in column phase (r + pw) % sw at index t + (r + pw) / sw
          const int64_t full = g.W / g.sw, rest = g.W - full * g.sw;
          auto dst = [&](int64_t r) { return drow + ((r + g.pw) % g.sw) * plane + (r + g.pw) / g.sw; };
          if (g.sw == 2) {  // the common stride: a deinterleave the compiler vectorises
            float* const d0 = dst(0);
            float* const d1 = dst(1);
            for (int64_t t = 0; t < full; ++t) {
              d0[t] = static_cast<float>(srow[2 * t]);
              d1[t] = static_cast<float>(srow[2 * t + 1]);
            }
          } else {
            for (int64_t r = 0; r < g.sw; ++r) {
              float* const dr = dst(r);
              for (int64_t t = 0; t < full; ++t) dr[t] = static_cast<float>(srow[t * g.sw + r]);
            }
          }
          for (int64_t r = 0; r < rest; ++r) dst(r)[full] = static_cast<float>(srow[full * g.sw + r]);
        }
      }
    }
  });
  std::vector<int64_t> off(K);
  for (int64_t c = 0; c < g.C; ++c)
    for (int64_t kz = 0; kz < g.kd; ++kz)
      for (int64_t ky = 0; ky < g.kh; ++ky)
        for (int64_t kx = 0; kx < g.kw; ++kx) {
          // the tap's shift in padded voxels, split by phase
          const int64_t tz = kz * g.dd, ty = ky * g.dh, tx = kx * g.dw;
          off[((c * g.kd + kz) * g.kh + ky) * g.kw + kx] =
              (((c * g.sd + tz % g.sd) * g.sh + ty % g.sh) * g.sw + tx % g.sw) * plane +
              ((tz / g.sd) * Hq + ty / g.sh) * Wq + tx / g.sw;
        }
  const int64_t chunks = int64_t(bounds.size()) - 1, tasks = tiles * chunks;
  const int64_t gunits = std::max<int64_t>(1, 64 / unit);
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> xtile(in_place || kPairs ? 0 : K * MT), out(gunits * unit * MT);
    std::vector<uint32_t> xpairs(kPairs ? K / 2 * MT : 0);
    std::vector<int64_t> seg;  // runs of valid outputs in the tile: (panel column, output pixel, length)
    int64_t packed = -1;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t tile = t / chunks, c = t % chunks, slice = tile / tpi, m0 = (tile % tpi) * MT;
      const int64_t b = slice / Do, od = slice % Do;
      const float* src = xpad + b * img + od * Hq * Wq + m0;
      if (tile != packed) {
        for (int64_t k = 0; !in_place && !kPairs && k < K; ++k) {
          const float* s = src + off[k];
          float* d = xtile.data() + k * MT;
          for (int64_t j = 0; j < MT; ++j) d[j] = s[j];
        }
        // pair panels: rows 2p and 2p + 1 interleaved as bf16 pairs (the padded image's floats are widened
        // bfloat16, so their high halves are the inputs exactly)
        for (int64_t p = 0; kPairs && p < K / 2; ++p) {
          if (used_pairs && !(*used_pairs)[p]) continue;   // no stored block reads these rows
          const float* s0 = src + off[2 * p];
          const float* s1 = src + off[2 * p + 1];
          uint32_t* d = xpairs.data() + p * MT;
          for (int64_t j = 0; j < MT; ++j) {
            uint32_t lo, hi;
            std::memcpy(&lo, s0 + j, sizeof(lo));
            std::memcpy(&hi, s1 + j, sizeof(hi));
            d[j] = (lo >> 16) | (hi & 0xFFFF0000u);
          }
        }
        seg.clear();
        int64_t oy = m0 / Wq, ox = m0 - oy * Wq;
        for (int64_t j = 0; j < MT && oy < Ho; ++oy, ox = 0) {
          const int64_t len = std::min(MT - j, Wq - ox), valid = std::max<int64_t>(0, std::min(len, Wo - ox));
          if (valid) seg.insert(seg.end(), {j, oy * Wo + ox, valid});
          j += len;
        }
        packed = tile;
      }
      for (int64_t u0 = bounds[c]; u0 < bounds[c + 1]; u0 += gunits) {
        const int64_t u1 = std::min(bounds[c + 1], u0 + gunits);
        if constexpr (kPairs) {
          compute(xpairs.data(), nullptr, u0, u1, out.data());
        } else if (in_place) {
          compute(src, off.data(), u0, u1, out.data());
        } else {
          compute(xtile.data(), nullptr, u0, u1, out.data());
        }
        for (int64_t i = 0; i < (u1 - u0) * unit; ++i) {
          const int64_t n = u0 * unit + i;
          const float bv = bias ? bias[n] : 0.f;
          const float* o = out.data() + i * MT;
          T* yr = y + (b * N + n) * Do * Ho * Wo + od * Ho * Wo;
          for (size_t q = 0; q < seg.size(); q += 3) {
            const float* os = o + seg[q];
            T* ys = yr + seg[q + 1];
            for (int64_t e = 0; e < seg[q + 2]; ++e) ys[e] = static_cast<T>(os[e] + bv);
          }
        }
      }
    }
  });
}

// A (possibly undefined) bias tensor as fp32 values (empty when undefined).
inline std::vector<float> bias_vec(const at::Tensor& bias) {
  if (!bias.defined()) return {};
  const at::Tensor b = bias.to(at::kFloat).contiguous();
  return std::vector<float>(b.const_data_ptr<float>(), b.const_data_ptr<float>() + b.numel());
}

// The n values at x as fp32 for the small-M GEMV paths (bsr_mm_fast, csr_fast): x itself for float, else a
// serial converted copy in buf.
template <typename T>
const float* as_f32(const T* x, int64_t n, std::vector<float>& buf) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else {
    buf.resize(n);
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(x[i]);
    return buf.data();
  }
}

// The bias widened to fp32 once per call (empty when there is none).
template <typename T>
std::vector<float> bias_f32(const T* bias, int64_t n) {
  std::vector<float> b;
  if (bias) {
    b.resize(n);
    for (int64_t i = 0; i < n; ++i) b[i] = static_cast<float>(bias[i]);
  }
  return b;
}

// Boundaries of `chunks` contiguous row ranges of about equal cost, cost(r) = unit * nnz(r) + row_cost.
inline std::vector<int64_t> balanced_chunks(const int32_t* ptr, int64_t rows, int64_t chunks, int64_t unit,
                                            int64_t row_cost) {
  chunks = std::max<int64_t>(1, std::min(chunks, rows));
  std::vector<int64_t> bounds(chunks + 1, rows);
  bounds[0] = 0;
  const double total = double(ptr[rows]) * unit + double(rows) * row_cost;
  int64_t c = 1;
  for (int64_t r = 0; r < rows && c < chunks; ++r) {
    const double done = double(ptr[r + 1]) * unit + double(r + 1) * row_cost;
    while (c < chunks && done >= total * c / chunks) bounds[c++] = r + 1;
  }
  for (; c < chunks; ++c) bounds[c] = rows;
  return bounds;
}

// How many M-vectors (nv) a register tile spans: enough that rows x vectors fill the accumulator
// registers for blocks of `rows_per_block` rows, but no wider than M needs.
inline int choose_nv(Isa isa, int64_t M, int64_t rows_per_block) {
  const int W = vec_floats(isa), acc = acc_regs(isa);
  const int64_t r = std::max<int64_t>(1, std::min<int64_t>(rows_per_block, acc / 2));
  int nv = 1;
  while (nv < 8 && nv * 2 * r <= acc) nv *= 2;
  nv = std::max(nv, 2);
  const int64_t mv = (M + W - 1) / W;  // vectors M needs
  while (nv > 1 && nv / 2 >= mv) nv /= 2;
  return nv;
}

}  // namespace sparsekit::cpu
