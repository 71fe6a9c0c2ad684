// First-use self-check for the specialised CUDA paths (tensor-core BSR, 2:4 on sparse tensor cores, the
// skinny "load sparse, compute dense" kernel). Each such path sits beside a generic kernel that computes the
// same op; before the specialised one runs for real on a device, it is run once on a small fixed problem and
// compared with the generic kernel. A path that disagrees is switched off for the process with a warning
// naming it, and the generic kernel serves every call: a wrong fragment or metadata layout on a GPU model we
// never ran on costs speed, not results.
//
// Environment, per path (the name given at the call site, e.g. SPARSEKIT_NM_SP):
//   unset or "1"  probe on first use per device, then run the path if the probe passed
//   "0"           never run the path (the generic kernel serves every call)
//   "force"       run the path without probing (tests use this to compare it with the reference directly)
#pragma once

#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

namespace sparsekit_cuda {

enum class PathMode { kOff, kAuto, kForce };

inline PathMode path_mode(const char* env_name) {
  const char* v = std::getenv(env_name);
  if (v == nullptr || std::strcmp(v, "1") == 0 || v[0] == '\0') return PathMode::kAuto;
  if (std::strcmp(v, "0") == 0) return PathMode::kOff;
  if (std::strcmp(v, "force") == 0) return PathMode::kForce;
  TORCH_CHECK(false, env_name, " must be unset, \"1\", \"0\" or \"force\", got \"", v, "\"");
  return PathMode::kAuto;
}

// Whether the specialised path named by env_name may run on `device`. probe() -> std::string runs the path
// and the generic kernel on a small problem and returns "" when they agree, or a description of the mismatch;
// it is called at most once per device per process (never while the current stream captures a CUDA graph:
// such calls take the generic kernel), and must call the path's raw launcher, not the gated
// entry point (that would ask this function again). Distinct call sites must pass distinct Tag types, so
// that each path keeps its own verdicts.
template <class Tag, class Probe>
bool path_enabled(const char* env_name, int device, Probe&& probe) {
  const PathMode mode = path_mode(env_name);
  if (mode == PathMode::kOff) return false;
  if (mode == PathMode::kForce) return true;
  constexpr int kMaxDevices = 64;
  static std::mutex mu;
  static int8_t verdict[kMaxDevices] = {};  // 0 not probed, 1 passed, -1 failed
  if (device < 0 || device >= kMaxDevices) return false;
  std::lock_guard<std::mutex> lock(mu);
  if (verdict[device] == 0) {
    // the probe synchronises, which a stream capturing a CUDA graph forbids: the generic kernel serves the
    // captured call and the probe runs on the first call outside a capture
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(device).stream(), &capture));
    if (capture != cudaStreamCaptureStatusNone) return false;
    const std::string mismatch = probe();
    verdict[device] = mismatch.empty() ? 1 : -1;
    if (!mismatch.empty()) {
      TORCH_WARN("sparsekit: the CUDA path ", env_name, " disagreed with the generic kernel on its first-use ",
                 "self-check on device ", device, " (", mismatch, "); it is switched off for this process and ",
                 "the generic kernel is used. Please report this with the GPU model.");
    }
  }
  return verdict[device] == 1;
}

// For a probe: "" when `got` matches `ref` (max |got - ref| <= rel_tol * (1 + max |ref|), in fp32), else
// "<what>: max abs difference <err>". The probes' entries are exact in fp16/bf16 with exact fp32 sums, so
// rel_tol only has to allow a final rounding step, far below what a layout error gives.
inline std::string probe_mismatch(const at::Tensor& got, const at::Tensor& ref, float rel_tol, const std::string& what) {
  const at::Tensor r = ref.to(at::kFloat);
  const float err = (got.to(at::kFloat) - r).abs().max().item<float>();
  if (err <= rel_tol * (1.0f + r.abs().max().item<float>())) return "";
  return what + ": max abs difference " + std::to_string(err);
}

inline const char* probe_dtype_name(at::ScalarType dtype) { return dtype == at::kHalf ? "float16" : "bfloat16"; }

}  // namespace sparsekit_cuda
