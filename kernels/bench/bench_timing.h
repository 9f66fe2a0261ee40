// Timing helpers of the GPU benchmarks (moeserve-expert-bench, moeserve-attention-bench,
// moeserve-linear-bench): a CUDA-call check that exits with the call's place, a status check that
// exits with the status, the median of timed runs on a stream, and
// the card's device-to-device copy bandwidth measured in the same run (the floor the benchmarks
// set their memory-bound kernels against). Header-only; include from .cu files only.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "absl/status/status.h"

#define CHECK_CUDA(call)                                                             \
  do {                                                                               \
    cudaError_t e = (call);                                                          \
    if (e != cudaSuccess) {                                                          \
      std::fprintf(stderr, "%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e)); \
      std::exit(1);                                                                  \
    }                                                                                \
  } while (0)

namespace moeserve::kernels::bench {

// Exits with the status's message where it is not OK (a benchmark has no caller to report to).
inline void ExitOnError(const absl::Status& status) {
  if (!status.ok()) {
    std::fprintf(stderr, "%s\n", status.ToString().c_str());
    std::exit(1);
  }
}

// Median milliseconds of `iterations` timed runs of `body` (enqueued on `stream`), after 3
// untimed warm-up runs.
template <typename F>
double MedianMs(F&& body, int iterations, cudaStream_t stream) {
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  for (int i = 0; i < 3; ++i) body();  // warm-up
  std::vector<float> times;
  for (int i = 0; i < iterations; ++i) {
    cudaEventRecord(start, stream);
    body();
    cudaEventRecord(stop, stream);
    cudaEventSynchronize(stop);
    float ms = 0;
    cudaEventElapsedTime(&ms, start, stop);
    times.push_back(ms);
  }
  std::sort(times.begin(), times.end());
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return times[times.size() / 2];
}

// Bytes per second (read + write, in GB/s) of a 2 GiB device-to-device copy.
inline double CopyGBps(cudaStream_t stream) {
  const size_t bytes = size_t{2} << 30;
  void *a, *b;
  CHECK_CUDA(cudaMalloc(&a, bytes));
  CHECK_CUDA(cudaMalloc(&b, bytes));
  const double ms =
      MedianMs([&] { cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, stream); }, 10, stream);
  cudaFree(a);
  cudaFree(b);
  return 2.0 * bytes / (ms * 1e-3) / 1e9;  // read + write
}

}  // namespace moeserve::kernels::bench
