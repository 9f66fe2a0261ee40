// Device-side reductions shared by the kernels (kernels.cu, mla.cu): warp sums and maxima, and
// the block-wide inverse RMS of a row. Header-only device code; include from .cu files only.
#pragma once

#include <cuda_runtime_api.h>

namespace moeserve::kernels {

inline constexpr int kWarpSize = 32;

__device__ inline float WarpReduceSum(float value) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    value += __shfl_xor_sync(0xffffffff, value, offset);
  return value;
}

__device__ inline float WarpReduceMax(float value) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    value = fmaxf(value, __shfl_xor_sync(0xffffffff, value, offset));
  return value;
}

// 1 / sqrt(mean(x²) + eps) of a row, given each thread's partial sum of squares; every thread
// of the block must call it (it synchronizes) and gets the result. blockDim.x <= 1024.
__device__ inline float BlockInverseRms(float partial_sum_of_squares, int dim, float eps) {
  __shared__ float partial[kWarpSize];
  const float sum = WarpReduceSum(partial_sum_of_squares);
  if (threadIdx.x % kWarpSize == 0) partial[threadIdx.x / kWarpSize] = sum;
  __syncthreads();
  if (threadIdx.x < kWarpSize) {
    float total = threadIdx.x < blockDim.x / kWarpSize ? partial[threadIdx.x] : 0.0f;
    total = WarpReduceSum(total);
    if (threadIdx.x == 0) partial[0] = rsqrtf(total / dim + eps);
  }
  __syncthreads();
  return partial[0];
}

}  // namespace moeserve::kernels
