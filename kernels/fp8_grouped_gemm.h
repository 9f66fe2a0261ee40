// Fp8GroupedGemm: DeepSeek-V3's block-scaled FP8 GEMM for many row groups (experts, or a
// layer's slots) in one launch, on Hopper's warpgroup tensor-core instructions (wgmma):
//   y[r] (bf16) = x[r] · W_g^T   for every row r of group g,
// x e4m3 with 1 x 128 scales, W_g e4m3 [n, k] with 128 x 128 block scales (fp8.h), fp32
// accumulation: each 128-wide slice of k is summed on the tensor cores and added to the total
// times its two scales, the recipe's promotion.
//
// Why a kernel of our own: cuBLASLt's block-scaled FP8 mode takes one matrix per call (its
// strided and pointer-array batch modes refuse these scales), so a decode step of many experts
// with a few rows each is hundreds of launches that each fill a fraction of the GPU. Two tile
// shapes (Fp8GemmTiles) serve the two regimes: narrow tiles stream every group's weight blocks
// once per 64 rows, which keeps a decode step of a few rows per group at the memory's
// bandwidth; wide tiles of 128 rows by 128 columns serve groups of more rows, where the
// arithmetic, not the weights' bytes, sets the time. There each block reads its two 16 KiB
// operand tiles per k slice from L2, which bounds it near 700 TFLOP/s on an H100; cuBLASLt's
// GEMM per group is faster from about 256 rows a group (docs/PERFORMANCE.md).
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
  // At least the rows' total (offsets[slots]), or -1 when unknown; wide tiles need it to size
  // their grid.
  int row_bound = -1;
};

// How a launch cuts the work into thread blocks.
//  - kNarrow: a block of 256 threads takes 128 weight columns of one group and that group's
//    rows 64 at a time, every thread both loading and multiplying (wgmma m64n64, the weight as
//    the 64-row operand). Made for decode's few rows per group, where the weights' bytes set
//    the time.
//  - kWide: a block of 384 threads takes 128 weight columns and one tile of 128 rows of one
//    group; one warpgroup loads a ring of six stages while two multiply 64 rows each (wgmma
//    m64n128), handing stages over through shared-memory barriers, so loads, multiplies and
//    promotions overlap. Made for groups of more than 64 rows.
//  - kBySize: kWide where the groups average more than 64 rows (kWideTileMinMeanRows), else
//    kNarrow. A slot form without a row_bound takes kNarrow.
// Both compute each output as the same sums in the same order: their outputs are equal bit for
// bit (Fp8Kernels.GroupedGemmMatchesTwinAndKeepsRowsIndependent).
enum class Fp8GemmTiles { kBySize, kNarrow, kWide };
inline constexpr int kWideTileMinMeanRows = 64;

// Whether `device` runs the kernel (compute capability 9.0: H100, H200).
bool Fp8GroupedGemmSupported(int device);

// Lets the kernel use the shared memory it needs on the current device. Once per device,
// before the first launch and outside a stream capture.
absl::Status PrepareFp8GroupedGemm();

// Whether the current device runs the kernel, prepared for it (PrepareFp8GroupedGemm) if so.
absl::StatusOr<bool> PrepareFp8GroupedGemmIfSupported();

// kWide on a slot form without a row_bound: INVALID_ARGUMENT.
absl::Status Fp8GroupedGemm(const __nv_fp8_e4m3* x, const float* x_scales, int scale_rows,
                            const Fp8GemmGroupList& groups, int n, int k, __nv_bfloat16* y,
                            cudaStream_t stream, Fp8GemmTiles tiles = Fp8GemmTiles::kBySize);
absl::Status Fp8GroupedGemm(const __nv_fp8_e4m3* x, const float* x_scales, int scale_rows,
                            const Fp8GemmSlotGroups& groups, int n, int k, __nv_bfloat16* y,
                            cudaStream_t stream, Fp8GemmTiles tiles = Fp8GemmTiles::kBySize);

}  // namespace moeserve::kernels
