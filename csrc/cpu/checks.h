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

inline int64_t grain_for(int64_t work_per_task) {
  return std::max<int64_t>(1, kMinWork / std::max<int64_t>(1, work_per_task));
}

}  // namespace sparsekit::cpu
