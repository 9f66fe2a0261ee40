#include <algorithm>

#include "absl/strings/str_cat.h"
#include "kernels/fp8_quantize.h"
#include "kernels/kernels.h"
#include "kernels/reductions.cuh"

namespace moeserve::kernels {
namespace {

// Tile kernels. A warp quantizes a run of up to kTilesPerWarp consecutive 128-column tiles of one
// padded row, two at a time: each half-warp owns a tile and each of its lanes 8 consecutive
// columns (one 16-byte load), and the half-warp reduces the tile's amax by shuffles. A run's
// loads are all issued before any value is used, so a warp keeps up to 2 KB in flight (4 KB for
// SiLU · up, which reads gate and up): enough per SM to stream at the memory's bandwidth, where
// one 256-byte tile per warp was not. The row's group is looked up once per run.
constexpr int kTileThreads = 256;
constexpr int kWarpsPerBlock = kTileThreads / kWarpSize;
constexpr int kHalfWarp = kWarpSize / 2;
constexpr int kLaneColumns = 8;
constexpr int kTilesPerWarp = 8;
constexpr int kSteps = kTilesPerWarp / 2;
static_assert(kFp8BlockSize == kLaneColumns * kHalfWarp, "a half-warp covers one tile");

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

__device__ float HalfWarpReduceMax(float value) {
  for (int offset = kHalfWarp / 2; offset > 0; offset /= 2)
    value = fmaxf(value, __shfl_xor_sync(0xffffffffu, value, offset));
  return value;
}

__device__ void Bf16x8ToFloats(const uint4& raw, float (&v)[kLaneColumns]) {
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    v[2 * i] = __uint_as_float(words[i] << 16);  // a bf16 is the top half of its float
    v[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
  }
}

// Quantizes a lane's 8 values of a tile whose amax its half-warp computes together (every lane
// of the warp must call it), stores them (8 bytes) where `store`, and, from the half-warp's first
// lane, the tile's scale.
__device__ void QuantizeLane(const float (&v)[kLaneColumns], bool store, __nv_fp8_e4m3* values_out,
                             float* scale_out) {
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < kLaneColumns; ++i) amax = fmaxf(amax, fabsf(v[i]));
  amax = HalfWarpReduceMax(amax);
  if (!store) return;
  uint32_t packed[2] = {0, 0};
  if (amax > 0) {
    // x * (448 / amax): one IEEE division per lane instead of one per value; the CPU twin uses
    // the same formula, so host and device stay bit-identical.
    const float inverse = kE4m3Max / amax;
#pragma unroll
    for (int word = 0; word < 2; ++word) {
      const __nv_fp8x2_storage_t low = __nv_cvt_float2_to_fp8x2(
          make_float2(v[4 * word] * inverse, v[4 * word + 1] * inverse), __NV_SATFINITE, __NV_E4M3);
      const __nv_fp8x2_storage_t high = __nv_cvt_float2_to_fp8x2(
          make_float2(v[4 * word + 2] * inverse, v[4 * word + 3] * inverse), __NV_SATFINITE,
          __NV_E4M3);
      packed[word] = static_cast<uint32_t>(low) | (static_cast<uint32_t>(high) << 16);
    }
  }
  *reinterpret_cast<uint2*>(values_out) = make_uint2(packed[0], packed[1]);
  if (threadIdx.x % kHalfWarp == 0) *scale_out = amax / kE4m3Max;
}

// A warp's run of tiles: output row `row`, tiles [first_tile, first_tile + kTilesPerWarp) of the
// row's `blocks`, and where they go: the row's codes from values[value_base] on, tile b's scale
// at scales[scale_base + b * scale_stride] (a group's padded row in its group's place, or a
// packed row).
struct TileRun {
  int row = 0, first_tile = 0;
  bool real = false;       // a real row of its group, not padding
  int64_t source_row = 0;  // the real row's index in the unpadded input
  int64_t value_base = 0;
  int64_t scale_base = 0;
  int64_t scale_stride = 0;
};

// The warp's row and first tile among `rows` rows of `blocks` tiles each, or false past the last
// run (the launch covers rows * runs per row warps: RunBlocks).
__device__ bool FindRowAndTile(int64_t rows, int blocks, TileRun& run) {
  const int runs_per_row = (blocks + kTilesPerWarp - 1) / kTilesPerWarp;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  if (warp >= rows * runs_per_row) return false;
  run.row = static_cast<int>(warp / runs_per_row);
  run.first_tile = static_cast<int>(warp % runs_per_row) * kTilesPerWarp;
  return true;
}

// The warp's run of the groups' padded rows, or false past the last one.
__device__ bool FindRun(const Fp8RowGroups& groups, int blocks, TileRun& run) {
  if (!FindRowAndTile(groups.padded_start[groups.count], blocks, run)) return false;
  const int group = GroupOfPaddedRow(groups, run.row);
  const int start = groups.padded_start[group];
  const int local_row = run.row - start;
  run.real = local_row < groups.source_start[group + 1] - groups.source_start[group];
  run.source_row = groups.source_start[group] + local_row;
  run.value_base = static_cast<int64_t>(run.row) * blocks * kFp8BlockSize;
  run.scale_base = static_cast<int64_t>(start) * blocks + local_row;
  run.scale_stride = groups.padded_start[group + 1] - start;
  return true;
}

// The warp's run of packed rows [0, rows) (Fp8PackedRowBytes), or false past the last one.
__device__ bool FindPackedRun(int rows, int blocks, TileRun& run) {
  if (!FindRowAndTile(rows, blocks, run)) return false;
  run.real = true;
  run.source_row = run.row;
  const int64_t cols = static_cast<int64_t>(blocks) * kFp8BlockSize;
  run.value_base = run.row * Fp8PackedRowBytes(cols);
  run.scale_base = (run.value_base + cols) / 4;  // in floats; both are multiples of 4 bytes
  run.scale_stride = 1;
  return true;
}

// Quantizes a run: the source's Fetch(step, column) issues a real row's loads of 8 values from
// `column` on (every step's first), Values(step, v) then gives them as floats.
template <class Source>
__device__ void QuantizeRun(const TileRun& run, int blocks, Source& source, __nv_fp8_e4m3* values,
                            float* scales) {
  const int half = (threadIdx.x % kWarpSize) / kHalfWarp;
  const int lane_column = (threadIdx.x % kHalfWarp) * kLaneColumns;
#pragma unroll
  for (int step = 0; step < kSteps; ++step) {
    const int tile = run.first_tile + 2 * step + half;
    if (run.real && tile < blocks) source.Fetch(step, tile * kFp8BlockSize + lane_column);
  }
#pragma unroll
  for (int step = 0; step < kSteps; ++step) {
    const int tile = run.first_tile + 2 * step + half;
    // Whole steps past the row's last tile are skipped by both halves alike.
    if (run.first_tile + 2 * step >= blocks) break;
    float v[kLaneColumns] = {};
    if (run.real && tile < blocks) source.Values(step, v);
    const int column = tile * kFp8BlockSize + lane_column;
    QuantizeLane(v, tile < blocks, values + run.value_base + column,
                 scales + run.scale_base + tile * run.scale_stride);
  }
}

// Plain activations: x [unpadded rows, cols].
struct ActivationSource {
  const __nv_bfloat16* row;
  uint4 raw[kSteps];
  __device__ void Fetch(int step, int column) {
    raw[step] = *reinterpret_cast<const uint4*>(row + column);
  }
  __device__ void Values(int step, float (&v)[kLaneColumns]) const { Bf16x8ToFloats(raw[step], v); }
};

// SiLU(gate) · up from gate_up [padded rows, 2 * inter], rounded to bf16 as SiluMul
// (kernels.cu) rounds it.
struct SiluMulSource {
  const __nv_bfloat16* row;
  int inter;
  uint4 gate[kSteps], up[kSteps];
  __device__ void Fetch(int step, int column) {
    gate[step] = *reinterpret_cast<const uint4*>(row + column);
    up[step] = *reinterpret_cast<const uint4*>(row + inter + column);
  }
  __device__ void Values(int step, float (&v)[kLaneColumns]) const {
    float g[kLaneColumns], u[kLaneColumns];
    Bf16x8ToFloats(gate[step], g);
    Bf16x8ToFloats(up[step], u);
#pragma unroll
    for (int i = 0; i < kLaneColumns; ++i) {
      v[i] = __bfloat162float(__float2bfloat16(g[i] / (1.0f + __expf(-g[i])) * u[i]));
    }
  }
};

__global__ void __launch_bounds__(kTileThreads)
    QuantizeGroupsKernel(const __nv_bfloat16* x, const int32_t* __restrict__ source_rows,
                         const __grid_constant__ Fp8RowGroups groups, int cols,
                         __nv_fp8_e4m3* values, float* scales) {
  const int blocks = cols / kFp8BlockSize;
  TileRun run;
  if (!FindRun(groups, blocks, run)) return;
  // A padding row reads nothing, so its index is never looked up (it may lie past the list).
  const int64_t row =
      source_rows != nullptr && run.real ? source_rows[run.source_row] : run.source_row;
  ActivationSource source{x + row * cols};
  QuantizeRun(run, blocks, source, values, scales);
}

__global__ void __launch_bounds__(kTileThreads)
    QuantizePackedKernel(const __nv_bfloat16* x, const int32_t* __restrict__ source_rows, int rows,
                         int cols, uint8_t* packed) {
  const int blocks = cols / kFp8BlockSize;
  TileRun run;
  if (!FindPackedRun(rows, blocks, run)) return;
  const int64_t row = source_rows != nullptr ? source_rows[run.row] : run.row;
  ActivationSource source{x + row * cols};
  QuantizeRun(run, blocks, source, reinterpret_cast<__nv_fp8_e4m3*>(packed),
              reinterpret_cast<float*>(packed));
}

// One warp per padded row: a real row's codes and scales copied from its packed row, a padding
// row's zeros (what quantizing it gives).
__global__ void __launch_bounds__(kTileThreads)
    UnpackGroupsKernel(const uint8_t* __restrict__ packed, const int32_t* __restrict__ source_rows,
                       const __grid_constant__ Fp8RowGroups groups, int cols, __nv_fp8_e4m3* values,
                       float* scales) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  if (row >= groups.padded_start[groups.count]) return;
  const int lane = threadIdx.x % kWarpSize;
  const int group = GroupOfPaddedRow(groups, static_cast<int>(row));
  const int start = groups.padded_start[group];
  const int local_row = static_cast<int>(row) - start;
  const int padded_rows = groups.padded_start[group + 1] - start;
  const int blocks = cols / kFp8BlockSize, units = cols / 16;
  uint4* out = reinterpret_cast<uint4*>(values + row * cols);
  float* out_scales = scales + static_cast<int64_t>(start) * blocks + local_row;
  if (local_row >= groups.source_start[group + 1] - groups.source_start[group]) {
    for (int u = lane; u < units; u += kWarpSize) out[u] = make_uint4(0, 0, 0, 0);
    for (int b = lane; b < blocks; b += kWarpSize) out_scales[b * padded_rows] = 0.0f;
    return;
  }
  int64_t source = groups.source_start[group] + local_row;
  if (source_rows != nullptr) source = source_rows[source];
  const uint8_t* in = packed + source * Fp8PackedRowBytes(cols);
  const uint4* codes = reinterpret_cast<const uint4*>(in);
  const float* in_scales = reinterpret_cast<const float*>(in + cols);
#pragma unroll 4
  for (int u = lane; u < units; u += kWarpSize) out[u] = codes[u];
  for (int b = lane; b < blocks; b += kWarpSize) out_scales[b * padded_rows] = in_scales[b];
}

__global__ void __launch_bounds__(kTileThreads)
    SiluMulQuantizeKernel(const __nv_bfloat16* gate_up, const __grid_constant__ Fp8RowGroups groups,
                          int inter, __nv_fp8_e4m3* values, float* scales) {
  const int blocks = inter / kFp8BlockSize;
  TileRun run;
  if (!FindRun(groups, blocks, run)) return;
  SiluMulSource source{gate_up + static_cast<int64_t>(run.row) * 2 * inter, inter};
  QuantizeRun(run, blocks, source, values, scales);
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

// Thread blocks for a warp per run of `rows` rows of `cols` columns (FindRowAndTile).
unsigned RunBlocks(int64_t rows, int cols) {
  const int64_t runs = rows * ((cols / kFp8BlockSize + kTilesPerWarp - 1) / kTilesPerWarp);
  return static_cast<unsigned>((runs + kWarpsPerBlock - 1) / kWarpsPerBlock);
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
                                         cudaStream_t stream, const int32_t* source_rows) {
  if (auto s = CheckColumns(cols, "QuantizeActivationsFp8"); !s.ok()) return s;
  if (groups.padded_rows() == 0) return absl::OkStatus();
  QuantizeGroupsKernel<<<RunBlocks(groups.padded_rows(), cols), kTileThreads, 0, stream>>>(
      x, source_rows, groups, cols, values, scales);
  return LaunchError("QuantizeActivationsFp8");
}

absl::Status QuantizeRowsToPackedFp8(const __nv_bfloat16* x, const int32_t* source_rows, int rows,
                                     int cols, uint8_t* packed, cudaStream_t stream) {
  if (auto s = CheckColumns(cols, "QuantizeRowsToPackedFp8"); !s.ok()) return s;
  if (rows < 0) return absl::InvalidArgumentError("QuantizeRowsToPackedFp8: negative rows");
  if (rows == 0) return absl::OkStatus();
  QuantizePackedKernel<<<RunBlocks(rows, cols), kTileThreads, 0, stream>>>(x, source_rows, rows,
                                                                           cols, packed);
  return LaunchError("QuantizeRowsToPackedFp8");
}

absl::Status QuantizeInputGroupsFp8(const Fp8InputRows& x, const Fp8RowGroups& groups, int cols,
                                    __nv_fp8_e4m3* values, float* scales, cudaStream_t stream) {
  if ((x.bf16 == nullptr) == (x.packed == nullptr)) {
    return absl::InvalidArgumentError(
        "QuantizeInputGroupsFp8: the input is either bf16 rows or packed FP8 rows");
  }
  if (x.bf16 != nullptr) {
    return QuantizeActivationGroupsFp8(x.bf16, groups, cols, values, scales, stream, x.rows);
  }
  if (auto s = CheckColumns(cols, "QuantizeInputGroupsFp8"); !s.ok()) return s;
  if (groups.padded_rows() == 0) return absl::OkStatus();
  UnpackGroupsKernel<<<static_cast<unsigned>((groups.padded_rows() + kWarpsPerBlock - 1) /
                                             kWarpsPerBlock),
                       kTileThreads, 0, stream>>>(x.packed, x.rows, groups, cols, values, scales);
  return LaunchError("QuantizeInputGroupsFp8");
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
  SiluMulQuantizeKernel<<<RunBlocks(groups.padded_rows(), inter), kTileThreads, 0, stream>>>(
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
