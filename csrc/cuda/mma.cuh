// Tensor-core helpers shared by the CUDA kernels that run mma.sync (bsr_mm_tc.cu, csr_skinny.cu, channel_conv.cu;
// nm_mm_sp.cu uses ld32 beside its own mma.sp).
#pragma once

#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

namespace sparsekit_cuda {

// Two adjacent 16-bit elements as one 32-bit register (p must be 4-byte aligned).
template <typename T>
__device__ __forceinline__ uint32_t ld32(const T* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

// c += a (16x16, row) * b (16x8, col) with fp32 accumulation; T = c10::Half for fp16 operands, anything else
// for bf16 (the operands are raw bits in registers either way).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, c10::Half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#else
  __trap();  // the host side only launches on compute capability >= 8.0
#endif
}

}  // namespace sparsekit_cuda
