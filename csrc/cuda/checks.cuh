// Input checks shared by the CUDA ops (device, dims, dtype), with messages naming the op and the argument.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

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

}  // namespace sparsekit_cuda
