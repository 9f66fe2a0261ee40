#include <cuda_fp8.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "kernels/fp8.h"
#include "kernels/fp8_weight_only_gemm.h"
#include "kernels/kernels.h"
#include "kernels/reductions.cuh"

namespace moeserve::kernels {
namespace {

// A block of 8 warps covers 8 * kColumns output columns of one group; each warp owns kColumns
// columns and walks k with 16 weights (16 bytes) per lane and step, so a warp's loads of a
// column are 512 contiguous bytes. Per step a lane holds its 16 activations of every row in
// registers and converts each weight once, for all rows. Rows go in passes of kRows (1, 2, 4
// or 8: the launch picks the smallest that holds the largest group), each pass reading the
// columns' weights once; more rows take fewer columns per warp, so that activations,
// weights and accumulators stay in registers with two blocks on an SM.
constexpr int kWarps = 8;
constexpr int kValuesPerLane = 16;
__host__ __device__ constexpr int ColumnsPerWarp(int rows) {
  return rows <= 2 ? 8 : rows == 4 ? 4 : 2;
}
static_assert(kFp8BlockSize % kValuesPerLane == 0, "a lane's 16 weights share one block scale");

// 16 e4m3 codes as floats.
__device__ void DecodeCodes(const uint4& codes, float (&out)[kValuesPerLane]) {
  const uint32_t words[4] = {codes.x, codes.y, codes.z, codes.w};
#pragma unroll
  for (int w = 0; w < 4; ++w) {
#pragma unroll
    for (int pair = 0; pair < 2; ++pair) {
      const __nv_fp8x2_storage_t two =
          static_cast<__nv_fp8x2_storage_t>((words[w] >> (16 * pair)) & 0xffffu);
      const __half2_raw raw = __nv_cvt_fp8x2_to_halfraw2(two, __NV_E4M3);
      const float2 values = __half22float2(*reinterpret_cast<const __half2*>(&raw));
      out[4 * w + 2 * pair] = values.x;
      out[4 * w + 2 * pair + 1] = values.y;
    }
  }
}

// sum_j x[j] * w[j] over a lane's 16 values, x as 16 packed bf16 (a bf16 is the top half of
// its float).
__device__ float Dot(const uint4 (&x)[2], const float (&w)[kValuesPerLane]) {
  float sum = 0.0f;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const uint32_t words[4] = {x[half].x, x[half].y, x[half].z, x[half].w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      sum = fmaf(__uint_as_float(words[i] << 16), w[half * 8 + 2 * i], sum);
      sum = fmaf(__uint_as_float(words[i] & 0xffff0000u), w[half * 8 + 2 * i + 1], sum);
    }
  }
  return sum;
}

template <int kRows>
__global__ void __launch_bounds__(kWarps* kWarpSize, 2)
    WeightOnlyGroupedGemmKernel(const __nv_bfloat16* __restrict__ x, Fp8WeightOnlyGroups groups,
                                int n, int k, int scale_stride, __nv_bfloat16* __restrict__ y) {
  constexpr int kColumnsPerWarp = ColumnsPerWarp(kRows);
  constexpr int kColumnsPerBlock = kWarps * kColumnsPerWarp;
  const Fp8WeightOnlyGroup& group = groups.group[blockIdx.y];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int first_column = blockIdx.x * kColumnsPerBlock + warp * kColumnsPerWarp;
  if (first_column >= n) return;
  const uint8_t* values = reinterpret_cast<const uint8_t*>(group.values);
  for (int first_row = 0; first_row < group.rows; first_row += kRows) {
    const int rows = min(kRows, group.rows - first_row);
    float sums[kRows][kColumnsPerWarp] = {};
    for (int kk = lane * kValuesPerLane; kk < k; kk += kWarpSize * kValuesPerLane) {
      uint4 codes[kColumnsPerWarp];
      float scales[kColumnsPerWarp];
#pragma unroll
      for (int c = 0; c < kColumnsPerWarp; ++c) {
        const int column = first_column + c;
        if (column < n) {
          codes[c] =
              *reinterpret_cast<const uint4*>(values + static_cast<int64_t>(column) * k + kk);
          scales[c] = group.scales[(column / kFp8BlockSize) * scale_stride + kk / kFp8BlockSize];
        } else {
          codes[c] = make_uint4(0, 0, 0, 0);
          scales[c] = 0.0f;
        }
      }
      uint4 row_values[kRows][2];
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        if (r < rows) {
          const uint4* source = reinterpret_cast<const uint4*>(
              x + static_cast<int64_t>(group.row_start + first_row + r) * k + kk);
          row_values[r][0] = source[0];
          row_values[r][1] = source[1];
        } else {
          row_values[r][0] = row_values[r][1] = make_uint4(0, 0, 0, 0);
        }
      }
#pragma unroll
      for (int c = 0; c < kColumnsPerWarp; ++c) {
        float weights[kValuesPerLane];
        DecodeCodes(codes[c], weights);
#pragma unroll
        for (int r = 0; r < kRows; ++r) sums[r][c] += Dot(row_values[r], weights) * scales[c];
      }
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
#pragma unroll
      for (int c = 0; c < kColumnsPerWarp; ++c) {
        const float total = WarpReduceSum(sums[r][c]);
        const int column = first_column + c;
        if (lane == 0 && r < rows && column < n) {
          y[static_cast<int64_t>(group.row_start + first_row + r) * n + column] =
              __float2bfloat16(total);
        }
      }
    }
  }
}

}  // namespace

absl::Status Fp8WeightOnlyGroupedGemm(const __nv_bfloat16* x, const Fp8WeightOnlyGroups& groups,
                                      int n, int k, __nv_bfloat16* y, cudaStream_t stream) {
  if (n <= 0 || k <= 0 || k % kFp8BlockSize != 0 || groups.count < 0 ||
      groups.count > kMaxFp8RowGroups) {
    return absl::InvalidArgumentError(absl::StrCat("Fp8WeightOnlyGroupedGemm: n ", n, ", k ", k,
                                                   " (a multiple of 128), ", groups.count,
                                                   " groups (at most ", kMaxFp8RowGroups, ")"));
  }
  if (groups.count == 0) return absl::OkStatus();
  int largest = 0;
  for (int g = 0; g < groups.count; ++g) largest = std::max(largest, groups.group[g].rows);
  const int threads = kWarps * kWarpSize;
  const int stride = WeightScaleStride(k);
  auto grid = [&](int rows) {
    const int columns = kWarps * ColumnsPerWarp(rows);
    return dim3((n + columns - 1) / columns, groups.count);
  };
  if (largest <= 1) {
    WeightOnlyGroupedGemmKernel<1><<<grid(1), threads, 0, stream>>>(x, groups, n, k, stride, y);
  } else if (largest <= 2) {
    WeightOnlyGroupedGemmKernel<2><<<grid(2), threads, 0, stream>>>(x, groups, n, k, stride, y);
  } else if (largest <= 4) {
    WeightOnlyGroupedGemmKernel<4><<<grid(4), threads, 0, stream>>>(x, groups, n, k, stride, y);
  } else {
    WeightOnlyGroupedGemmKernel<8><<<grid(8), threads, 0, stream>>>(x, groups, n, k, stride, y);
  }
  return CudaStatus(cudaGetLastError(), "Fp8WeightOnlyGroupedGemm");
}

}  // namespace moeserve::kernels
