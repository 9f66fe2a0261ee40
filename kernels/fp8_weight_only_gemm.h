// Fp8WeightOnlyGroupedGemm: the routed experts' projections for the few rows per expert of a
// decode step, every expert in one launch —
//   y[rows of g] (bf16) = x[rows of g] (bf16) · dequant(W_g)^T,   dequant(W) = e4m3 * block scale
// with W e4m3 and 128 x 128 block scales (fp8.h's weight layout), read once per row pass and
// dequantized in registers, and fp32 accumulation. The activations are not quantized: at one to
// a few rows per expert the step is bound by reading the weights, which FP8 halves, and the
// activation quantization of DeepSeek-V3's recipe (Fp8BlockGemm) would only add launches and
// error. Prefill-sized groups take the recipe's cuBLASLt GEMMs instead (fp8_expert_mlp.h).
// Raw device pointers, sizes and a stream; thread-safe as far as CUDA streams are. CPU twin:
// Fp8WeightOnlyGemmTwin (fp8_twins.h).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/fp8_quantize.h"

namespace moeserve::kernels {

// One group (an expert's rows): rows [row_start, row_start + rows) of x and y, and its weight.
struct Fp8WeightOnlyGroup {
  const __nv_fp8_e4m3* values = nullptr;  // [n, k]
  const float* scales = nullptr;          // [Fp8Blocks(n)][WeightScaleStride(k)]
  int row_start = 0;
  int rows = 0;
};

// The groups of one launch, passed by value (no host-to-device copy; about 12 KB of kernel
// parameters, which needs CUDA 12.1 or later, as Fp8RowGroups does); empty groups may be left
// out.
struct Fp8WeightOnlyGroups {
  int count = 0;
  Fp8WeightOnlyGroup group[kMaxFp8RowGroups];
};

// x [*, k] and y [*, n] row-major bf16, addressed through the groups' rows. k % 128 == 0.
absl::Status Fp8WeightOnlyGroupedGemm(const __nv_bfloat16* x, const Fp8WeightOnlyGroups& groups,
                                      int n, int k, __nv_bfloat16* y, cudaStream_t stream);

}  // namespace moeserve::kernels
