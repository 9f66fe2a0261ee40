// Fp8BlockGemm: DeepSeek-V3's block-scaled FP8 GEMM through cuBLASLt on Hopper —
//   y[rows, n] (bf16) = x[rows, k] · W[n, k]^T,
// x e4m3 with 1 x 128 scales (CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F), W e4m3 with 128 x 128
// block scales (CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F), fp32 accumulation, layouts of
// fp8.h. In cuBLAS's column-major terms this is the "TN" product that FP8 needs on Hopper:
// D[n, rows] = op_T(A = W as [k, n]) · B (= x as [k, rows]), so the weight carries the 2D scales
// and the activations the 1D ones.
//
// It owns a cuBLASLt handle, the matmul descriptor, a workspace and, per shape, the matrix
// layouts and the algorithm cuBLASLt's heuristic picked (looked up once). Bound to one stream;
// one instance per stream and thread; not thread-safe.
#pragma once

#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <map>
#include <memory>
#include <tuple>

#include "absl/status/statusor.h"
#include "kernels/device_array.h"
#include "kernels/fp8.h"

namespace moeserve::kernels {

// A block-scaled FP8 weight on the device (fp8.h layout).
struct Fp8Weight {
  const __nv_fp8_e4m3* values = nullptr;  // [out, in]
  const float* scales = nullptr;          // [Fp8Blocks(out)][WeightScaleStride(in)]
};

// A cuBLASLt result as a status (INTERNAL naming `what` and the status name on failure).
absl::Status CublasLtStatus(cublasStatus_t status, const char* what);

class Fp8BlockGemm {
 public:
  static constexpr size_t kDefaultWorkspaceBytes = size_t{32} << 20;  // cuBLAS's advice for Hopper

  static absl::StatusOr<Fp8BlockGemm> Create(cudaStream_t stream,
                                             size_t workspace_bytes = kDefaultWorkspaceBytes);
  Fp8BlockGemm(Fp8BlockGemm&&) noexcept;
  Fp8BlockGemm& operator=(Fp8BlockGemm&&) noexcept;
  ~Fp8BlockGemm();

  // Looks up (once per shape) the algorithm for `rows` activation rows, n outputs and k inputs.
  // Fails with the heuristic's status where cuBLASLt has none (e.g. no block-scaled FP8 on the
  // device). n % 128 == 0 and k % 128 == 0.
  absl::Status Prepare(int64_t rows, int n, int k);

  // y [Fp8PaddedRows(rows), n] = x · w^T; x_values [Fp8PaddedRows(rows), k] and x_scales in the
  // activation layout of fp8.h (QuantizeActivationsFp8). The padding rows of y are written too
  // (zeros, from x's zero padding rows): y needs room for them.
  absl::Status Run(const __nv_fp8_e4m3* x_values, const float* x_scales, int64_t rows,
                   const Fp8Weight& w, int n, int k, __nv_bfloat16* y);

  cudaStream_t stream() const { return stream_; }

 private:
  struct Plan;  // layouts and algorithm of one shape
  Fp8BlockGemm() = default;
  absl::StatusOr<const Plan*> FindPlan(int64_t rows, int n, int k);

  cudaStream_t stream_ = nullptr;
  cublasLtHandle_t handle_ = nullptr;
  cublasLtMatmulDesc_t matmul_ = nullptr;
  DeviceArray<uint8_t> workspace_;
  std::map<std::tuple<int64_t, int, int>, std::unique_ptr<Plan>> plans_;
};

}  // namespace moeserve::kernels
