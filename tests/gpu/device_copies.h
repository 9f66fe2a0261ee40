// What the GPU tests share for moving test data: whether a GPU is present (tests skip without
// one), and copies of host vectors to and from device memory that fail the test on a CUDA error.
// The device copies are owned by the test (cudaFree them, or let the process end). Test-only;
// not thread-safe beyond what the CUDA runtime is.
#pragma once

#include <cuda_runtime_api.h>

#include <vector>

#include "gtest/gtest.h"

namespace moeserve::testing {

inline bool HaveGpu() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
}

// A little past the end, so that an empty vector still gets a valid pointer.
template <typename T>
T* ToDevice(const std::vector<T>& host) {
  T* device = nullptr;
  EXPECT_EQ(cudaMalloc(&device, host.size() * sizeof(T) + 16), cudaSuccess);
  EXPECT_EQ(cudaMemcpy(device, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice),
            cudaSuccess);
  return device;
}

template <typename T>
std::vector<T> ToHost(const T* device, size_t count) {
  std::vector<T> host(count);
  EXPECT_EQ(cudaMemcpy(host.data(), device, count * sizeof(T), cudaMemcpyDeviceToHost),
            cudaSuccess);
  return host;
}

}  // namespace moeserve::testing

#define REQUIRE_GPU() \
  if (!::moeserve::testing::HaveGpu()) GTEST_SKIP() << "no GPU"
