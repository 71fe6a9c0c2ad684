// Input checks shared by the CUDA ops (device, dims, dtype, the optional bias, the grid size of a launch), with
// messages naming the op and the argument.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <optional>

namespace sparsekit_cuda {

inline void check_cuda(const char* op, const at::Tensor& t, const char* name, int64_t dim, const at::Tensor& ref) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but the other inputs are on ",
              ref.device());
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
}

inline void check_floating(const char* op, const at::Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16, op, ": ", name,
              " must be float32, float64, float16 or bfloat16, got ", s);
}

inline void check_same_dtype(const char* op, const at::Tensor& t, const char* name, const at::Tensor& ref,
                      const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have the dtype of ", ref_name, " (",
              ref.scalar_type(), "), got ", t.scalar_type());
}

// The optional bias of an op: undefined when absent, else checked (a 1-D CUDA tensor on ref's device, of ref's
// dtype, with `size` entries) and made contiguous. `size_name` names the size in the message
// "bias must have <size_name><size> entries, got ...".
inline at::Tensor checked_bias(const char* op, const std::optional<at::Tensor>& bias, const at::Tensor& ref,
                               const char* ref_name, int64_t size, const char* size_name) {
  if (!bias.has_value() || !bias->defined()) return at::Tensor();
  check_cuda(op, *bias, "bias", 1, ref);
  check_same_dtype(op, *bias, "bias", ref, ref_name);
  TORCH_CHECK(bias->size(0) == size, op, ": bias must have ", size_name, size, " entries, got ", bias->size(0));
  return bias->contiguous();
}

// The grid of a 1-D launch of `blocks` thread blocks (at least one), or an error when it passes INT_MAX.
inline unsigned grid_size(const char* op, int64_t blocks) {
  TORCH_CHECK(blocks <= INT_MAX, op, ": problem too large for one launch (", blocks, " thread blocks)");
  return static_cast<unsigned>(std::max<int64_t>(blocks, 1));
}

}  // namespace sparsekit_cuda
