// Fp8Linear: one dense projection whose weight is block-scaled FP8 (e4m3 with 128 x 128 scales,
// fp8.h) —
//   y[rows, n] (bf16) = x[rows, k] (bf16) · dequant(W)^T      (or y += that, `accumulate`)
// with fp32 accumulation. It picks the path by the row count:
//   - few rows (decode): the weight-only kernel (fp8_weight_only_gemm.h) reads each weight once,
//     dequantizes it in registers and leaves the activations in bf16 — the step is bound by the
//     weight's bytes, which FP8 halves;
//   - more rows: DeepSeek-V3's recipe — the activations quantized per 1 x 128 tile, then
//     cuBLASLt's block-scaled FP8 GEMM (fp8_gemm.h) — bound by the tensor cores' FP8 rate.
// It owns the GEMM (cuBLASLt handle and workspace), the quantized activations and an output
// scratch, sized at creation for max_rows rows, k up to max_k and n up to max_n. One instance per
// stream; not thread-safe. CPU twins: Fp8WeightOnlyGemmTwin, and QuantizeActivationsFp8Twin with
// Fp8GemmTwin (fp8_twins.h).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "kernels/device_array.h"
#include "kernels/fp8_gemm.h"
#include "kernels/fp8_weight_only_gemm.h"

namespace moeserve::kernels {

class Fp8Linear {
 public:
  // Up to this many rows take the weight-only kernel by default (measured on an H100 at
  // DeepSeek-V3's projections: docs/PERFORMANCE.md, `moeserve-linear-bench`).
  static constexpr int kDefaultWeightOnlyMaxRows = 1;

  // max_k and max_n: multiples of 128. weight_only_max_rows: the largest row count that takes
  // the weight-only kernel (0: never; benchmarks pick a path with it).
  static absl::StatusOr<Fp8Linear> Create(int max_rows, int max_k, int max_n, cudaStream_t stream,
                                          int weight_only_max_rows = kDefaultWeightOnlyMaxRows);
  Fp8Linear(Fp8Linear&&) noexcept;
  Fp8Linear& operator=(Fp8Linear&&) noexcept;
  ~Fp8Linear();

  // x [rows, k] and y [rows, n], row-major bf16 on the device; w [n, k] in fp8.h's layout.
  // n and k multiples of 128 within the sizes of Create; rows <= max_rows. y needs no room past
  // its rows. INVALID_ARGUMENT for sizes outside those.
  absl::Status Run(const __nv_bfloat16* x, int rows, const Fp8Weight& w, int n, int k,
                   __nv_bfloat16* y, bool accumulate = false);

  int weight_only_max_rows() const { return weight_only_max_rows_; }

 private:
  Fp8Linear() = default;

  int max_rows_ = 0, max_k_ = 0, max_n_ = 0, weight_only_max_rows_ = 0;
  cudaStream_t stream_ = nullptr;
  std::unique_ptr<Fp8BlockGemm> gemm_;
  DeviceArray<__nv_fp8_e4m3> x_values_;   // [Fp8PaddedRows(max_rows), max_k]
  DeviceArray<float> x_scales_;           // ActivationScaleCount(max_rows, max_k)
  DeviceArray<__nv_bfloat16> y_scratch_;  // [Fp8PaddedRows(max_rows), max_n]
  std::unique_ptr<Fp8WeightOnlyGroups> weight_only_groups_;  // one group: all rows
};

}  // namespace moeserve::kernels
