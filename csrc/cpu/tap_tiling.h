// The output layout of a transposed convolution whose kernel equals its stride (U-Net's 2x2 stride-2
// up-convolutions, no padding): its kernel taps tile the output, so each image's y^T [n = C_out * taps, M = input
// pixels] is a permutation of its output [C_out, *(sizes * kernel)]. Element (r, m) of y^T lands at
// row_off[r] + col_off[m] of the image, and the *_mm_xt_tiled ops store their fp32 panels there
// (store_panel_tiled): no y^T tensor is allocated, and the output is written once instead of twice.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace sparsekit::cpu {

struct TapTiling {
  // stride_d below: the output's memory stride along spatial dim d (not the conv's stride, which is kernel_d)
  std::vector<int64_t> row_off;  // [n]: row r = (c, *tap) of y^T -> c * image_per_channel + sum tap_d * stride_d
  std::vector<int64_t> col_off;  // [M]: pixel m = (*p) of x -> sum p_d * kernel_d * stride_d
  std::vector<int64_t> shape;    // the output's shape: [B, C_out, *(sizes * kernel)]
  int64_t image = 0;             // elements of one image of the output
};

// Checks sizes / kernel against xt [B, K, M] and n (op names the op in errors) and builds the offsets.
inline TapTiling tap_tiling(const char* op, const at::Tensor& xt, int64_t n, at::IntArrayRef sizes,
                            at::IntArrayRef kernel) {
  const size_t nd = sizes.size();
  TORCH_CHECK(nd >= 1 && nd <= 3 && kernel.size() == nd, op, ": sizes and kernel must both have 1 to 3 entries "
              "(the spatial dims), got sizes=", sizes, " and kernel=", kernel);
  // every product below is checked: the offsets address the output, so a wrapped one would write out of bounds
  auto mul = [&](int64_t a, int64_t b) {
    int64_t r = 0;
    TORCH_CHECK(!__builtin_mul_overflow(a, b, &r), op, ": the output of sizes ", sizes, " times kernel ", kernel,
                " (n=", n, ") has more elements than int64 holds");
    return r;
  };
  int64_t pixels = 1, taps = 1;
  for (size_t d = 0; d < nd; ++d) {
    TORCH_CHECK(sizes[d] >= 0, op, ": sizes must be >= 0, got ", sizes);
    TORCH_CHECK(kernel[d] >= 1, op, ": kernel must be >= 1 in every dim, got ", kernel);
    pixels = mul(pixels, sizes[d]);
    taps = mul(taps, kernel[d]);
  }
  TORCH_CHECK(pixels == xt.size(2), op, ": xt.size(2) (M=", xt.size(2), ") must be the product of sizes ", sizes,
              " (", pixels, ")");
  TORCH_CHECK(n % taps == 0, op, ": n (", n, ") must be a multiple of the kernel's taps prod(kernel) = ", taps);
  TapTiling t;
  const int64_t c_out = n / taps;
  std::vector<int64_t> out_stride(nd);
  int64_t per_channel = 1;
  for (size_t d = nd; d-- > 0;) {
    out_stride[d] = per_channel;
    per_channel = mul(per_channel, mul(sizes[d], kernel[d]));
  }
  t.image = mul(c_out, per_channel);   // (then every offset, < image, fits too)
  mul(t.image, std::max<int64_t>(1, xt.size(0)));
  t.shape = {xt.size(0), c_out};
  for (size_t d = 0; d < nd; ++d) t.shape.push_back(sizes[d] * kernel[d]);
  t.row_off.resize(n);
  for (int64_t r = 0; r < n; ++r) {
    int64_t rest = r % taps, off = (r / taps) * per_channel;
    for (size_t d = nd; d-- > 0;) {
      off += (rest % kernel[d]) * out_stride[d];
      rest /= kernel[d];
    }
    t.row_off[r] = off;
  }
  t.col_off.resize(pixels);
  for (int64_t m = 0; m < pixels; ++m) {
    int64_t rest = m, off = 0;
    for (size_t d = nd; d-- > 0;) {
      off += (rest % sizes[d]) * kernel[d] * out_stride[d];
      rest /= sizes[d];
    }
    t.col_off[m] = off;
  }
  return t;
}

// The fp32 panel out[rows][MT] (columns [0, mc)) + bias[i] per row into one image y of the tiled output; row_off
// and col_off point at the panel's first row and column. Consecutive rows are neighbouring taps of one channel,
// so a panel fills whole cache lines of y between them.
template <typename T>
void store_panel_tiled(const float* out, int64_t MT, int64_t rows, int64_t mc, const float* bias, T* y,
                       const int64_t* row_off, const int64_t* col_off) {
  for (int64_t i = 0; i < rows; ++i) {
    const float bv = bias ? bias[i] : 0.f;
    const float* o = out + i * MT;
    T* yr = y + row_off[i];
    for (int64_t j = 0; j < mc; ++j) yr[col_off[j]] = static_cast<T>(o[j] + bv);
  }
}

// y^T [B, n, M] rearranged into the tiled output, for the paths that do not store through the offsets (float64,
// AMX): [B, C_out, *kernel, *sizes] -> [B, C_out, s0, k0, s1, k1, ...].
inline at::Tensor tile_taps(const at::Tensor& yt, const TapTiling& t, at::IntArrayRef sizes, at::IntArrayRef kernel) {
  const int64_t nd = int64_t(sizes.size());
  std::vector<int64_t> split = {yt.size(0), t.shape[1]}, order = {0, 1};
  split.insert(split.end(), kernel.begin(), kernel.end());
  split.insert(split.end(), sizes.begin(), sizes.end());
  for (int64_t d = 0; d < nd; ++d) {
    order.push_back(2 + nd + d);
    order.push_back(2 + d);
  }
  return yt.reshape(split).permute(order).contiguous().view(t.shape);
}

}  // namespace sparsekit::cpu
