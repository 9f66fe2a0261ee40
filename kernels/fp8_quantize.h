// FP8 quantization kernels of DeepSeek-V3's recipe (layouts in fp8.h): bf16 activations to e4m3
// with 1 x 128 tile scales, the fused SiLU-multiply-quantize between the experts' two GEMMs, and
// bf16 weights to e4m3 with 128 x 128 block scales. Raw device pointers, sizes and a stream; each
// returns a status. CPU twins in fp8_twins.h. Thread-safe as far as CUDA streams are.
//
// Row groups: the routed experts' rows travel grouped by expert, and each group is padded to a
// multiple of 4 rows on its own (fp8.h), so that one expert's rows form a standalone FP8
// activation matrix that cuBLASLt can read. Fp8RowGroups describes both the unpadded rows (as the
// bf16 activations come and go) and the padded ones; it is passed to the kernels by value (no
// host-to-device copy).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/fp8.h"

namespace moeserve::kernels {

inline constexpr int kMaxFp8RowGroups = 512;

struct Fp8RowGroups {
  int count = 0;
  // Group g owns unpadded rows [source_start[g], source_start[g + 1]) and padded rows
  // [padded_start[g], padded_start[g + 1]), padded_start[g + 1] - padded_start[g] =
  // Fp8PaddedRows(its rows). Its 1 x 128 scales start at padded_start[g] * Fp8Blocks(cols).
  int source_start[kMaxFp8RowGroups + 1] = {};
  int padded_start[kMaxFp8RowGroups + 1] = {};

  int64_t rows(int group) const { return source_start[group + 1] - source_start[group]; }
  int64_t padded_rows() const { return padded_start[count]; }
};

// Groups from row offsets (experts + 1 entries, offsets[0] == 0); INVALID_ARGUMENT beyond
// kMaxFp8RowGroups groups or 2^31 rows.
absl::StatusOr<Fp8RowGroups> MakeFp8RowGroups(const std::vector<int64_t>& offsets);

// x bf16 [rows, cols] -> values [Fp8PaddedRows(rows), cols] and 1 x 128 scales (fp8.h layout).
// cols % 128 == 0.
absl::Status QuantizeActivationsFp8(const __nv_bfloat16* x, int rows, int cols,
                                    __nv_fp8_e4m3* values, float* scales, cudaStream_t stream);

// The same for grouped rows: x [groups.source_start[count], cols] unpadded -> values
// [groups.padded_rows(), cols] and scales, each group in its own padded block.
// With `source_rows` (device, groups.source_start[count] entries), grouped row i reads x row
// source_rows[i] instead of row i: the permute into expert order and the quantization in one pass
// over the activations (x may then hold fewer rows, or rows that several experts read). A tile's
// quantization depends on its row only, so the result equals permuting first.
absl::Status QuantizeActivationGroupsFp8(const __nv_bfloat16* x, const Fp8RowGroups& groups,
                                         int cols, __nv_fp8_e4m3* values, float* scales,
                                         cudaStream_t stream, const int32_t* source_rows = nullptr);

// The rows an FP8 MLP reads (fp8_expert_mlp.h): bf16 activations, quantized on the way in, or
// packed FP8 rows (Fp8PackedRowBytes, fp8.h) that their sender quantized, which only move into
// place. Exactly one of bf16 and packed is set. Input row i is the source's row rows[i] (rows on
// the device), or its row i without rows. Both forms of the same activations give the same
// bits: a tile's quantization depends on its row only.
struct Fp8InputRows {
  const __nv_bfloat16* bf16 = nullptr;
  const uint8_t* packed = nullptr;
  const int32_t* rows = nullptr;

  // The input from its row `first` on.
  Fp8InputRows From(int64_t first, int cols) const {
    if (rows != nullptr) return {bf16, packed, rows + first};
    return {bf16 != nullptr ? bf16 + first * cols : nullptr,
            packed != nullptr ? packed + first * Fp8PackedRowBytes(cols) : nullptr, nullptr};
  }
};

// The sender's side of an FP8 dispatch: packed row i (of `rows`) quantizes x's row
// source_rows[i] (device; row i without source_rows), the gather into send order and the
// quantization in one pass. x bf16 [.., cols], cols % 128 == 0.
absl::Status QuantizeRowsToPackedFp8(const __nv_bfloat16* x, const int32_t* source_rows, int rows,
                                     int cols, uint8_t* packed, cudaStream_t stream);

// Input rows -> values [groups.padded_rows(), cols] and scales, as QuantizeActivationGroupsFp8
// lays them out (grouped row i is input row i): bf16 rows are quantized, packed ones unpacked
// (their codes and scales copied into the groups' layout, padding rows zero).
absl::Status QuantizeInputGroupsFp8(const Fp8InputRows& x, const Fp8RowGroups& groups, int cols,
                                    __nv_fp8_e4m3* values, float* scales, cudaStream_t stream);

// gate_up bf16 [groups.padded_rows(), 2 * inter] (gate then up, padded rows) -> act =
// bf16(silu(gate) * up), quantized as above into values [groups.padded_rows(), inter] and scales.
// The bf16 rounding of act matches SiluMul (kernels.h), so the FP8 path differs from the bf16
// one only by the quantization. inter % 128 == 0.
absl::Status SiluMulQuantizeFp8(const __nv_bfloat16* gate_up, const Fp8RowGroups& groups, int inter,
                                __nv_fp8_e4m3* values, float* scales, cudaStream_t stream);

// Copies the real rows of the groups whose row count is not a multiple of 4 from `padded`
// [groups.padded_rows(), cols] to their unpadded places in `out`; other groups are left alone.
absl::Status CopyUnalignedGroupRows(const __nv_bfloat16* padded, const Fp8RowGroups& groups,
                                    int cols, __nv_bfloat16* out, cudaStream_t stream);

// w bf16 [out, in] -> values [out, in] and 128 x 128 block scales [Fp8Blocks(out)]
// [WeightScaleStride(in)] (padding entries 0). For weights that come in bf16 (tests, benchmarks,
// bf16 checkpoints); DeepSeek-V3's checkpoint is already in this form.
absl::Status QuantizeWeightBlocksFp8(const __nv_bfloat16* w, int out, int in, __nv_fp8_e4m3* values,
                                     float* scales, cudaStream_t stream);

}  // namespace moeserve::kernels
