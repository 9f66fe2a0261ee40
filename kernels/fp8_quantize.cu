#include <algorithm>

#include "absl/strings/str_cat.h"
#include "kernels/fp8_quantize.h"
#include "kernels/kernels.h"
#include "kernels/reductions.cuh"

namespace moeserve::kernels {
namespace {

// Tile kernels: one warp per (padded row, 128-column tile); each lane owns 4 consecutive
// columns, so a warp reads its tile with one coalesced access and reduces the amax by shuffles.
constexpr int kTileThreads = 256;
constexpr int kTilesPerBlock = kTileThreads / kWarpSize;
static_assert(kFp8BlockSize == 4 * kWarpSize, "a lane quantizes 4 columns of a tile");

// The group of padded row `row`: the last g with padded_start[g] <= row.
__device__ int GroupOfPaddedRow(const Fp8RowGroups& groups, int row) {
  int low = 0, high = groups.count - 1;
  while (low < high) {
    const int middle = (low + high + 1) / 2;
    if (groups.padded_start[middle] <= row) {
      low = middle;
    } else {
      high = middle - 1;
    }
  }
  return low;
}

// Quantizes one lane's 4 values of a tile whose warp-wide amax the lanes compute together, and
// stores them (4 bytes) and, from lane 0, the tile's scale.
__device__ void QuantizeLane(const float (&v)[4], __nv_fp8_e4m3* values_out, float* scale_out) {
  float amax = fmaxf(fmaxf(fabsf(v[0]), fabsf(v[1])), fmaxf(fabsf(v[2]), fabsf(v[3])));
  amax = WarpReduceMax(amax);
  const float scale = amax / kE4m3Max;
  uint32_t packed = 0;
  if (amax > 0) {
    // x * (448 / amax): one IEEE division per lane instead of one per value; the CPU twin uses
    // the same formula, so host and device stay bit-identical.
    const float inverse = kE4m3Max / amax;
    const __nv_fp8x2_storage_t low = __nv_cvt_float2_to_fp8x2(
        make_float2(v[0] * inverse, v[1] * inverse), __NV_SATFINITE, __NV_E4M3);
    const __nv_fp8x2_storage_t high = __nv_cvt_float2_to_fp8x2(
        make_float2(v[2] * inverse, v[3] * inverse), __NV_SATFINITE, __NV_E4M3);
    packed = static_cast<uint32_t>(low) | (static_cast<uint32_t>(high) << 16);
  }
  *reinterpret_cast<uint32_t*>(values_out) = packed;
  if (threadIdx.x % kWarpSize == 0) *scale_out = scale;
}

// Where a tile of padded row `row` and column block `block` lives, given its group.
struct TilePlace {
  int group;
  int local_row;     // row within the group
  int group_rows;    // the group's real rows
  int64_t scale_at;  // index of the tile's scale
};

__device__ TilePlace PlaceTile(const Fp8RowGroups& groups, int row, int block, int blocks) {
  TilePlace place;
  place.group = GroupOfPaddedRow(groups, row);
  const int start = groups.padded_start[place.group];
  place.local_row = row - start;
  place.group_rows = groups.source_start[place.group + 1] - groups.source_start[place.group];
  const int padded_rows = groups.padded_start[place.group + 1] - start;
  place.scale_at = static_cast<int64_t>(start) * blocks +
                   static_cast<int64_t>(block) * padded_rows + place.local_row;
  return place;
}

__device__ void LoadBf16x4(const __nv_bfloat16* source, float (&v)[4]) {
  const uint2 raw = *reinterpret_cast<const uint2*>(source);  // 8-byte aligned: cols % 128 == 0
  const __nv_bfloat162 a = *reinterpret_cast<const __nv_bfloat162*>(&raw.x);
  const __nv_bfloat162 b = *reinterpret_cast<const __nv_bfloat162*>(&raw.y);
  v[0] = __low2float(a);
  v[1] = __high2float(a);
  v[2] = __low2float(b);
  v[3] = __high2float(b);
}

__global__ void __launch_bounds__(kTileThreads)
    QuantizeGroupsKernel(const __nv_bfloat16* x, const __grid_constant__ Fp8RowGroups groups,
                         int cols, __nv_fp8_e4m3* values, float* scales) {
  const int blocks = cols / kFp8BlockSize;
  const int64_t tile = static_cast<int64_t>(blockIdx.x) * kTilesPerBlock + threadIdx.x / kWarpSize;
  if (tile >= static_cast<int64_t>(groups.padded_start[groups.count]) * blocks) return;
  const int row = static_cast<int>(tile / blocks), block = static_cast<int>(tile % blocks);
  const TilePlace place = PlaceTile(groups, row, block, blocks);
  const int column = block * kFp8BlockSize + (threadIdx.x % kWarpSize) * 4;
  float v[4] = {0, 0, 0, 0};
  if (place.local_row < place.group_rows) {
    const int64_t source_row = groups.source_start[place.group] + place.local_row;
    LoadBf16x4(x + source_row * cols + column, v);
  }
  QuantizeLane(v, values + static_cast<int64_t>(row) * cols + column, scales + place.scale_at);
}

__global__ void __launch_bounds__(kTileThreads)
    SiluMulQuantizeKernel(const __nv_bfloat16* gate_up, const __grid_constant__ Fp8RowGroups groups,
                          int inter, __nv_fp8_e4m3* values, float* scales) {
  const int blocks = inter / kFp8BlockSize;
  const int64_t tile = static_cast<int64_t>(blockIdx.x) * kTilesPerBlock + threadIdx.x / kWarpSize;
  if (tile >= static_cast<int64_t>(groups.padded_start[groups.count]) * blocks) return;
  const int row = static_cast<int>(tile / blocks), block = static_cast<int>(tile % blocks);
  const TilePlace place = PlaceTile(groups, row, block, blocks);
  const int column = block * kFp8BlockSize + (threadIdx.x % kWarpSize) * 4;
  float v[4] = {0, 0, 0, 0};
  if (place.local_row < place.group_rows) {
    float gate[4], up[4];
    const __nv_bfloat16* source = gate_up + static_cast<int64_t>(row) * 2 * inter + column;
    LoadBf16x4(source, gate);
    LoadBf16x4(source + inter, up);
    for (int i = 0; i < 4; ++i) {
      // The formula and bf16 rounding of SiluMul (kernels.cu).
      v[i] = __bfloat162float(__float2bfloat16(gate[i] / (1.0f + __expf(-gate[i])) * up[i]));
    }
  }
  QuantizeLane(v, values + static_cast<int64_t>(row) * inter + column, scales + place.scale_at);
}

// One block per padded row; rows of groups with a multiple of 4 rows, and padding rows, skip.
__global__ void CopyUnalignedRowsKernel(const __nv_bfloat16* padded,
                                        const __grid_constant__ Fp8RowGroups groups, int cols,
                                        __nv_bfloat16* out) {
  const int row = blockIdx.x;
  const int group = GroupOfPaddedRow(groups, row);
  const int rows = groups.source_start[group + 1] - groups.source_start[group];
  const int local_row = row - groups.padded_start[group];
  if (rows % kFp8RowAlignment == 0 || local_row >= rows) return;
  const uint4* source = reinterpret_cast<const uint4*>(padded + static_cast<int64_t>(row) * cols);
  uint4* destination = reinterpret_cast<uint4*>(
      out + static_cast<int64_t>(groups.source_start[group] + local_row) * cols);
  for (int i = threadIdx.x; i < cols / 8; i += blockDim.x) destination[i] = source[i];
}

// One block of 256 threads per 128 x 128 weight block (or per padding entry of the scales).
__global__ void __launch_bounds__(256)
    QuantizeWeightBlocksKernel(const __nv_bfloat16* w, int out, int in, __nv_fp8_e4m3* values,
                               float* scales) {
  const int in_block = blockIdx.x, out_block = blockIdx.y;
  const int stride = gridDim.x;
  if (in_block * kFp8BlockSize >= in) {
    if (threadIdx.x == 0) scales[out_block * stride + in_block] = 0.0f;
    return;
  }
  const int row0 = out_block * kFp8BlockSize, column0 = in_block * kFp8BlockSize;
  const int rows = min(kFp8BlockSize, out - row0), columns = min(kFp8BlockSize, in - column0);
  float amax = 0;
  for (int i = threadIdx.x; i < rows * columns; i += blockDim.x) {
    const int r = i / columns, c = i % columns;
    amax =
        fmaxf(amax, fabsf(__bfloat162float(w[static_cast<int64_t>(row0 + r) * in + column0 + c])));
  }
  __shared__ float warp_max[256 / kWarpSize];
  amax = WarpReduceMax(amax);
  if (threadIdx.x % kWarpSize == 0) warp_max[threadIdx.x / kWarpSize] = amax;
  __syncthreads();
  amax = 0;
  for (int i = 0; i < 256 / kWarpSize; ++i) amax = fmaxf(amax, warp_max[i]);
  const float scale = amax / kE4m3Max, inverse = kE4m3Max / amax;
  if (threadIdx.x == 0) scales[out_block * stride + in_block] = scale;
  for (int i = threadIdx.x; i < rows * columns; i += blockDim.x) {
    const int r = i / columns, c = i % columns;
    const int64_t at = static_cast<int64_t>(row0 + r) * in + column0 + c;
    __nv_fp8_e4m3 value;
    value.__x = amax > 0 ? __nv_cvt_float_to_fp8(__bfloat162float(w[at]) * inverse, __NV_SATFINITE,
                                                 __NV_E4M3)
                         : __nv_fp8_storage_t{0};
    values[at] = value;
  }
}

absl::Status LaunchError(const char* what) { return CudaStatus(cudaGetLastError(), what); }

absl::Status CheckColumns(int cols, const char* what) {
  if (cols <= 0 || cols % kFp8BlockSize != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": columns must be a positive multiple of 128, got ", cols));
  }
  return absl::OkStatus();
}

int TileBlocks(const Fp8RowGroups& groups, int cols) {
  const int64_t tiles = groups.padded_rows() * (cols / kFp8BlockSize);
  return static_cast<int>((tiles + kTilesPerBlock - 1) / kTilesPerBlock);
}

}  // namespace

absl::StatusOr<Fp8RowGroups> MakeFp8RowGroups(const std::vector<int64_t>& offsets) {
  if (offsets.empty() || offsets[0] != 0) {
    return absl::InvalidArgumentError("FP8 row groups: offsets must start at 0");
  }
  const int count = static_cast<int>(offsets.size()) - 1;
  if (count > kMaxFp8RowGroups) {
    return absl::InvalidArgumentError(
        absl::StrCat("FP8 row groups: ", count, " groups, at most ", kMaxFp8RowGroups));
  }
  Fp8RowGroups groups;
  groups.count = count;
  int64_t padded = 0;
  for (int g = 0; g < count; ++g) {
    const int64_t rows = offsets[g + 1] - offsets[g];
    if (rows < 0) return absl::InvalidArgumentError("FP8 row groups: offsets must not decrease");
    padded += Fp8PaddedRows(rows);
  }
  if (padded >= (int64_t{1} << 31)) {
    return absl::InvalidArgumentError("FP8 row groups: more than 2^31 padded rows");
  }
  padded = 0;
  for (int g = 0; g <= count; ++g) {
    groups.source_start[g] = static_cast<int>(offsets[g]);
    groups.padded_start[g] = static_cast<int>(padded);
    if (g < count) padded += Fp8PaddedRows(offsets[g + 1] - offsets[g]);
  }
  return groups;
}

absl::Status QuantizeActivationGroupsFp8(const __nv_bfloat16* x, const Fp8RowGroups& groups,
                                         int cols, __nv_fp8_e4m3* values, float* scales,
                                         cudaStream_t stream) {
  if (auto s = CheckColumns(cols, "QuantizeActivationsFp8"); !s.ok()) return s;
  if (groups.padded_rows() == 0) return absl::OkStatus();
  QuantizeGroupsKernel<<<TileBlocks(groups, cols), kTileThreads, 0, stream>>>(x, groups, cols,
                                                                              values, scales);
  return LaunchError("QuantizeActivationsFp8");
}

absl::Status QuantizeActivationsFp8(const __nv_bfloat16* x, int rows, int cols,
                                    __nv_fp8_e4m3* values, float* scales, cudaStream_t stream) {
  auto groups = MakeFp8RowGroups({0, rows});
  if (!groups.ok()) return groups.status();
  return QuantizeActivationGroupsFp8(x, *groups, cols, values, scales, stream);
}

absl::Status SiluMulQuantizeFp8(const __nv_bfloat16* gate_up, const Fp8RowGroups& groups, int inter,
                                __nv_fp8_e4m3* values, float* scales, cudaStream_t stream) {
  if (auto s = CheckColumns(inter, "SiluMulQuantizeFp8"); !s.ok()) return s;
  if (groups.padded_rows() == 0) return absl::OkStatus();
  SiluMulQuantizeKernel<<<TileBlocks(groups, inter), kTileThreads, 0, stream>>>(
      gate_up, groups, inter, values, scales);
  return LaunchError("SiluMulQuantizeFp8");
}

absl::Status CopyUnalignedGroupRows(const __nv_bfloat16* padded, const Fp8RowGroups& groups,
                                    int cols, __nv_bfloat16* out, cudaStream_t stream) {
  if (cols % 8 != 0) {
    return absl::InvalidArgumentError("CopyUnalignedGroupRows: columns must be a multiple of 8");
  }
  if (groups.padded_rows() == 0) return absl::OkStatus();
  CopyUnalignedRowsKernel<<<static_cast<unsigned>(groups.padded_rows()), 128, 0, stream>>>(
      padded, groups, cols, out);
  return LaunchError("CopyUnalignedGroupRows");
}

absl::Status QuantizeWeightBlocksFp8(const __nv_bfloat16* w, int out, int in, __nv_fp8_e4m3* values,
                                     float* scales, cudaStream_t stream) {
  if (out <= 0 || in <= 0) {
    return absl::InvalidArgumentError("QuantizeWeightBlocksFp8: empty weight");
  }
  const dim3 grid(WeightScaleStride(in), Fp8Blocks(out));
  QuantizeWeightBlocksKernel<<<grid, 256, 0, stream>>>(w, out, in, values, scales);
  return LaunchError("QuantizeWeightBlocksFp8");
}

}  // namespace moeserve::kernels
