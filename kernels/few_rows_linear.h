// FewRowsLinear: a dense projection for the few rows of a decode step —
//   y[rows, n] = x[rows, k] · W^T        (y bf16 or fp32; or y += that)
// with x bf16, W [n, k] bf16 or block-scaled e4m3 (fp8.h's layout, widened exactly to bf16 in
// the kernel: no activation quantization, so FP8 weights cost no accuracy beyond their own), fp32
// accumulation. It runs the routed experts' grouped GEMM kernel (device_moe.h) with the
// projection as its only slot: every weight is read once, through shared-memory stages, at close
// to the memory's bandwidth. A projection with few output columns would leave most of the GPU
// idle, and a few blocks per SM leave each block's start and end exposed, so k is split into
// shares across several waves of blocks; the block that finishes a column block last adds its
// shares' fp32 sums in share order (no second kernel). The split depends only on (n, k) and the
// GPU's multiprocessor count, so a row's result does not depend on the rows beside it or on how
// many there are: a token gets the same bits in any batch (EP invariance, CUDA graphs of any batch
// size). It owns the shares' scratch. One instance per stream; not thread-safe. CPU twins:
// GroupedLinearTwin (bf16) and Fp8WeightOnlyGemmTwin (FP8), cpu_twins.h and fp8_twins.h.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>
#include <library_types.h>

#include "absl/status/statusor.h"
#include "kernels/device_array.h"
#include "kernels/fp8_gemm.h"

namespace moeserve::kernels {

class FewRowsLinear {
 public:
  // The rows of one call: one pass of the kernel, which reads each weight once.
  static constexpr int kMaxRows = 16;
  // A weight: bf16, or FP8 (values and scales); exactly one of the two.
  struct Weight {
    const __nv_bfloat16* bf16 = nullptr;
    Fp8Weight fp8;
  };

  // Whether the kernel takes these widths: n % 8 == 0, k % 128 == 0.
  static bool Supports(int n, int k);
  // For outputs up to max_n wide, on the current device.
  static absl::StatusOr<FewRowsLinear> Create(int max_n, cudaStream_t stream);

  // x [rows, k] bf16 and y [rows, n] (y_type CUDA_R_16BF or CUDA_R_32F), row-major on the
  // device; rows <= kMaxRows, n <= max_n, Supports(n, k). INVALID_ARGUMENT otherwise.
  absl::Status Run(const __nv_bfloat16* x, int rows, const Weight& w, int n, int k, void* y,
                   cudaDataType y_type, bool accumulate = false);

  // The number of k shares a projection of these widths runs in.
  int KShares(int n, int k) const;

 private:
  FewRowsLinear() = default;
  int max_n_ = 0, multiprocessors_ = 0;
  cudaStream_t stream_ = nullptr;
  DeviceArray<float> partials_;  // [shares][rows][n]
  DeviceArray<int> counters_;    // one per 128 output columns, zero between calls
};

// The scratch of a split DeviceOneWeightGemm: the shares' partial sums [shares][rows][n], and a
// counter per 128 output columns, zero between launches.
struct OneWeightScratch {
  float* partials = nullptr;
  int* counters = nullptr;
};

// The grouped GEMM's kernel for one weight and no plan (device_moe.cu): y = rows [0, rows) of x
// times `w`^T, k in k_shares shares of whole 128-wide steps, each share's fp32 sums kept in
// `scratch` and added up in share order by the block that finishes a column block last (one
// kernel). One share and no accumulation: straight to y.
absl::Status DeviceOneWeightGemm(const __nv_bfloat16* x, int rows, const FewRowsLinear::Weight& w,
                                 int n, int k, int k_shares, const OneWeightScratch& scratch,
                                 void* y, cudaDataType y_type, bool accumulate,
                                 cudaStream_t stream);

}  // namespace moeserve::kernels
