// Tensor-core and asynchronous-copy primitives shared by the kernels that use them
// (device_moe.cu, mla.cu): the bf16 m16n8k16 mma, ldmatrix loads of its fragments from shared
// memory, and cp.async copies from global to shared memory. They need compute capability 8.0;
// the backend never launches their kernels below it, where they trap. Header-only device code;
// include from .cu files only.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace moeserve::kernels {

// c += a · b for a 16×16 bf16 tile a (row-major fragment a0..a3) and a 16×8 tile b (b0, b1),
// fp32 accumulators c (rows lane / 4 and lane / 4 + 8, columns 2 (lane % 4) + {0, 1}).
__device__ __forceinline__ void Mma(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                    uint32_t a3, uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

__device__ __forceinline__ uint32_t SharedAddress(const void* shared) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(shared));
}

// Four 8×8 bf16 matrices; lane l gives the address of row l % 8 of matrix l / 8 (16 bytes) and
// receives in r[i] the pair (row lane / 4, columns 2 (lane % 4) + {0, 1}) of matrix i.
__device__ __forceinline__ void LoadMatrix4(uint32_t (&r)[4], const void* row) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SharedAddress(row)));
#endif
}
// Two matrices (lanes 0-15 give the addresses; the others' are ignored but must be valid).
__device__ __forceinline__ void LoadMatrix2(uint32_t (&r)[2], const void* row) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(SharedAddress(row)));
#endif
}
// As LoadMatrix4/2, transposed: r[i] holds (rows 2 (lane % 4) + {0, 1}, column lane / 4).
__device__ __forceinline__ void LoadMatrix4Transposed(uint32_t (&r)[4], const void* row) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SharedAddress(row)));
#endif
}
__device__ __forceinline__ void LoadMatrix2Transposed(uint32_t (&r)[2], const void* row) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(SharedAddress(row)));
#endif
}

// Copies `bytes` (16, or 0 to fill the 16 bytes with zeros) from global to shared memory
// without passing through registers; completes at CpAsyncWait.
__device__ __forceinline__ void CpAsync16(void* shared, const void* global, int bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(SharedAddress(shared)),
               "l"(global), "r"(bytes));
#endif
}
// Four bytes (a scale); cached in L1, since neighbouring blocks read the same scales.
__device__ __forceinline__ void CpAsync4(void* shared, const void* global) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(SharedAddress(shared)),
               "l"(global));
#endif
}
__device__ __forceinline__ void CpAsyncCommit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
// Waits until at most kPending committed groups of this thread are still in flight.
template <int kPending>
__device__ __forceinline__ void CpAsyncWait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
#endif
}

}  // namespace moeserve::kernels
