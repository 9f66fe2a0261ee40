// What the GPU tests share for test data: whether a GPU is present (tests skip without one),
// copies of host vectors to and from device memory that fail the test on a CUDA error (owned by
// the test: cudaFree them, or let the process end, or hold them in a DeviceMemory), random bf16
// values and the relative error of bf16 results. Test-only; not thread-safe beyond what the CUDA
// runtime is.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/bf16.h"

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

// Device allocations freed with the test; Allocate fills them with 0xff bytes, so that a kernel
// that leaves an output unwritten shows it.
class DeviceMemory {
 public:
  DeviceMemory() = default;
  DeviceMemory(const DeviceMemory&) = delete;
  DeviceMemory& operator=(const DeviceMemory&) = delete;
  ~DeviceMemory() {
    for (void* p : owned_) cudaFree(p);
  }
  template <typename T>
  T* Upload(const std::vector<T>& host) {
    T* device = Allocate<T>(host.size());
    EXPECT_EQ(cudaMemcpy(device, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice),
              cudaSuccess);
    return device;
  }
  template <typename T>
  T* Allocate(size_t count) {
    void* device = nullptr;
    EXPECT_EQ(cudaMalloc(&device, count * sizeof(T) + 16), cudaSuccess);
    EXPECT_EQ(cudaMemset(device, 0xff, count * sizeof(T) + 16), cudaSuccess);
    owned_.push_back(device);
    return static_cast<T*>(device);
  }

 private:
  std::vector<void*> owned_;
};

// Normal(0, scale) values rounded to bf16, the same for the same seed.
inline std::vector<uint16_t> RandomBf16(size_t count, unsigned seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<uint16_t> values(count);
  for (auto& v : values) v = kernels::FloatToBf16(normal(rng));
  return values;
}

// max |a - b| / max |b| over bf16 arrays.
inline double RelativeError(const std::vector<uint16_t>& a, const std::vector<uint16_t>& b) {
  double diff = 0, scale = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    diff = std::max(diff, static_cast<double>(
                              std::fabs(kernels::Bf16ToFloat(a[i]) - kernels::Bf16ToFloat(b[i]))));
    scale = std::max(scale, static_cast<double>(std::fabs(kernels::Bf16ToFloat(b[i]))));
  }
  return scale > 0 ? diff / scale : diff;
}

}  // namespace moeserve::testing

#define REQUIRE_GPU() \
  if (!::moeserve::testing::HaveGpu()) GTEST_SKIP() << "no GPU"
