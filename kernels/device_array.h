// DeviceArray: the one owning device-memory buffer of moeserve — a growable, move-only array of
// T in the current CUDA device's memory, used by the kernels, the GPU backend, the benchmarks
// and the GPU tests. Reserve() keeps the contents only when no reallocation is needed (a
// scratch buffer); Upload() replaces them; Download() copies them out.
// Not thread-safe; used by the thread that drives its device.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace moeserve::kernels {

template <typename T>
class DeviceArray {
 public:
  DeviceArray() = default;
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  DeviceArray(DeviceArray&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), capacity_(std::exchange(other.capacity_, 0)) {}
  DeviceArray& operator=(DeviceArray&& other) noexcept {
    std::swap(data_, other.data_);
    std::swap(capacity_, other.capacity_);
    return *this;
  }
  ~DeviceArray() {
    if (data_ != nullptr) cudaFree(data_);
  }

  // Makes room for `count` elements (at least one, so data() is never null).
  absl::Status Reserve(size_t count) {
    if (count <= capacity_ && data_ != nullptr) return absl::OkStatus();
    if (data_ != nullptr) cudaFree(data_);
    data_ = nullptr;
    capacity_ = 0;
    const size_t elements = count > 0 ? count : 1;
    if (cudaError_t e = cudaMalloc(&data_, elements * sizeof(T)); e != cudaSuccess) {
      data_ = nullptr;
      return absl::ResourceExhaustedError(absl::StrCat(
          "GPU memory: cannot allocate ", elements * sizeof(T), " bytes: ", cudaGetErrorString(e)));
    }
    capacity_ = elements;
    return absl::OkStatus();
  }

  // Copies `count` host elements in, on `stream`; the host buffer may be reused on return.
  absl::Status Upload(const T* host, size_t count, cudaStream_t stream) {
    if (auto s = Reserve(count); !s.ok()) return s;
    if (count == 0) return absl::OkStatus();
    cudaError_t e = cudaMemcpyAsync(data_, host, count * sizeof(T), cudaMemcpyHostToDevice, stream);
    if (e == cudaSuccess) e = cudaStreamSynchronize(stream);
    if (e != cudaSuccess) {
      return absl::InternalError(absl::StrCat("GPU upload: ", cudaGetErrorString(e)));
    }
    return absl::OkStatus();
  }

  // Copies the first `count` elements out to `host` on `stream` and waits for them.
  absl::Status Download(T* host, size_t count, cudaStream_t stream) const {
    if (count > capacity_) {
      return absl::OutOfRangeError(
          absl::StrCat("GPU download of ", count, " elements from ", capacity_));
    }
    if (count == 0) return absl::OkStatus();
    cudaError_t e = cudaMemcpyAsync(host, data_, count * sizeof(T), cudaMemcpyDeviceToHost, stream);
    if (e == cudaSuccess) e = cudaStreamSynchronize(stream);
    if (e != cudaSuccess) {
      return absl::InternalError(absl::StrCat("GPU download: ", cudaGetErrorString(e)));
    }
    return absl::OkStatus();
  }

  T* data() { return data_; }
  const T* data() const { return data_; }
  // The memory as another element type (byte buffers that hold several kinds of data).
  template <typename U>
  U* as() const {
    return reinterpret_cast<U*>(data_);
  }
  size_t capacity() const { return capacity_; }
  size_t bytes() const { return capacity_ * sizeof(T); }

 private:
  T* data_ = nullptr;
  size_t capacity_ = 0;
};

}  // namespace moeserve::kernels
