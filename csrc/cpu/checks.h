// Argument checks and small helpers shared by the CPU kernel files (CPU-only; never included by .cu files).
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>

namespace sparsekit::cpu {

constexpr int64_t kMaxBlock = 128;   // sparsekit.formats.MAX_BLOCK
constexpr int64_t kMinWork = 32768;  // multiply-adds per parallel chunk, so tiny problems stay serial

inline const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kByte: return "torch.uint8";
    case at::kLong: return "torch.int64";
    default: return c10::toString(t);
  }
}

inline void check_tensor(const char* op, const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
}

inline void check_floating(const char* op, const at::Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16, op, ": ", name,
              " must be float32, float64, float16 or bfloat16, got ", dtype_name(s));
}

inline void check_same_dtype(const char* op, const at::Tensor& t, const char* name, const at::Tensor& ref,
                             const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have the dtype of ", ref_name, " (",
              dtype_name(ref.scalar_type()), "), got ", dtype_name(t.scalar_type()));
}

// The stored values of a sparse weight (every format): a contiguous dim-D CPU tensor of ref's dtype.
inline void check_values(const char* op, const at::Tensor& values, int64_t dim, const at::Tensor& ref,
                         const char* ref_name) {
  check_tensor(op, values, "values", dim);
  check_same_dtype(op, values, "values", ref, ref_name);
  TORCH_CHECK(values.is_contiguous(), op, ": values must be contiguous");
}

// The dense operand and the values of a BSR / CSR product (x, xt or dy): a floating act_dim-D CPU tensor, and
// values as check_values checks them against it.
inline void check_operands(const char* op, const at::Tensor& act, const char* act_name, int64_t act_dim,
                           const at::Tensor& values, int64_t values_dim) {
  check_tensor(op, act, act_name, act_dim);
  check_floating(op, act, act_name);
  check_values(op, values, values_dim, act, act_name);
}

// The two dense operands of an SDDMM (every format): dy floating 2-D, x 2-D of dy's dtype.
inline void check_sddmm_operands(const char* op, const at::Tensor& dy, const at::Tensor& x) {
  check_tensor(op, dy, "dy", 2);
  check_floating(op, dy, "dy");
  check_tensor(op, x, "x", 2);
  check_same_dtype(op, x, "x", dy, "dy");
}

// An SDDMM's x and dy must have the same number of rows M (the contraction).
inline void check_sddmm_rows(const char* op, const at::Tensor& dy, const at::Tensor& x) {
  TORCH_CHECK(x.size(0) == dy.size(0), op, ": x and dy must have the same number of rows M, got x.size(0)=",
              x.size(0), " and dy.size(0)=", dy.size(0));
}

// The optional bias of a *_mm op: undefined when absent, else checked (1-D, ref's dtype, n entries) and
// contiguous.
inline at::Tensor checked_bias(const char* op, const std::optional<at::Tensor>& bias, int64_t n,
                               const at::Tensor& ref, const char* ref_name) {
  if (!bias.has_value() || !bias->defined()) return at::Tensor();
  check_tensor(op, *bias, "bias", 1);
  check_same_dtype(op, *bias, "bias", ref, ref_name);
  TORCH_CHECK(bias->size(0) == n, op, ": bias must have n=", n, " entries, got ", bias->size(0));
  return bias->contiguous();
}

// checked_bias's result as the kernels take it: a T pointer, null when there is no bias.
template <typename T>
const T* bias_ptr(const at::Tensor& bias) {
  return bias.defined() ? bias.const_data_ptr<T>() : nullptr;
}

inline int64_t grain_for(int64_t work_per_task) {
  return std::max<int64_t>(1, kMinWork / std::max<int64_t>(1, work_per_task));
}

}  // namespace sparsekit::cpu
