// Fp8GroupedGemm: DeepSeek-V3's block-scaled FP8 GEMM for many row groups (experts, or a
// layer's slots) in one launch, on Hopper's warpgroup tensor-core instructions (wgmma):
//   y[r] (bf16) = x[r] · W_g^T   for every row r of group g,
// x e4m3 with 1 x 128 scales, W_g e4m3 [n, k] with 128 x 128 block scales (fp8.h), fp32
// accumulation: each 128-wide slice of k is summed on the tensor cores and added to the total
// times its two scales, the recipe's promotion.
//
// Why a kernel of our own: cuBLASLt's block-scaled FP8 mode takes one matrix per call (its
// strided and pointer-array batch modes refuse these scales), so a decode step of many experts
// with a few rows each is hundreds of launches that each fill a fraction of the GPU. Here every
// group's 128-row weight blocks stream through a ring of shared-memory stages once per 64 rows,
// which keeps a decode step at the memory's bandwidth. Groups of hundreds of rows are
// compute-bound, and cuBLASLt's GEMMs are faster there (docs/PERFORMANCE.md).
//
// The activations are quantized as one group (QuantizeActivationGroupsFp8 over all rows):
// values [scale_rows, k] and the scale of row r and k slice b at x_scales[b * scale_rows + r],
// scale_rows = Fp8PaddedRows(rows). Group g owns rows [offsets[g], offsets[g + 1]) of x and of
// y [rows, n]; only those rows of y are written. n % 128 == 0, k % 128 == 0.
//
// A row's output depends on its row and its group's weight only, not on the rows beside it.
// The kernel is built for compute capability 9.0 (sm_90a) only; Fp8GroupedGemmSupported says
// whether a device runs it. Raw device pointers, sizes and a stream; thread-safe as far as
// CUDA streams are. CPU twin: Fp8GemmTwin (fp8_twins.h), group by group.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/fp8_gemm.h"
#include "kernels/fp8_quantize.h"

namespace moeserve::kernels {

// Groups known on the host, passed to the kernel by value.
struct Fp8GemmGroupList {
  int count = 0;
  int offsets[kMaxFp8RowGroups + 1] = {};  // group g: rows [offsets[g], offsets[g + 1])
  Fp8Weight weights[kMaxFp8RowGroups] = {};
};

// Groups planned on the device (DeviceSlotPlan's offsets) with one weight per slot.
struct Fp8GemmSlotGroups {
  const int32_t* offsets = nullptr;    // device, [slots + 1]
  const Fp8Weight* weights = nullptr;  // device, [slots]
  int slots = 0;
  // At least the number of slots with rows (e.g. the rows' total), or -1 for every slot.
  int busy_slot_bound = -1;
};

// Whether `device` runs the kernel (compute capability 9.0: H100, H200).
bool Fp8GroupedGemmSupported(int device);

// Lets the kernel use the shared memory it needs on the current device. Once per device,
// before the first launch and outside a stream capture.
absl::Status PrepareFp8GroupedGemm();

// Whether the current device runs the kernel, prepared for it (PrepareFp8GroupedGemm) if so.
absl::StatusOr<bool> PrepareFp8GroupedGemmIfSupported();

absl::Status Fp8GroupedGemm(const __nv_fp8_e4m3* x, const float* x_scales, int scale_rows,
                            const Fp8GemmGroupList& groups, int n, int k, __nv_bfloat16* y,
                            cudaStream_t stream);
absl::Status Fp8GroupedGemm(const __nv_fp8_e4m3* x, const float* x_scales, int scale_rows,
                            const Fp8GemmSlotGroups& groups, int n, int k, __nv_bfloat16* y,
                            cudaStream_t stream);

}  // namespace moeserve::kernels
