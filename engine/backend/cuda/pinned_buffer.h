// PinnedBuffer: growable page-locked host memory, for copies between host and GPU that must
// not wait for the stream on the host (a copy from pageable memory is staged synchronously)
// and that run at full bus speed (the step's logits). Not thread-safe; not copyable.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstring>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "engine/base/status_macros.h"

namespace moeserve::engine::cuda {

class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  ~PinnedBuffer() {
    if (data_ != nullptr) cudaFreeHost(data_);
  }

  // Makes room for `bytes` (the contents are lost when it grows).
  absl::Status Reserve(size_t bytes) {
    if (bytes <= capacity_) return absl::OkStatus();
    if (data_ != nullptr) cudaFreeHost(data_);
    data_ = nullptr;
    capacity_ = 0;
    if (cudaError_t e = cudaMallocHost(&data_, bytes); e != cudaSuccess) {
      data_ = nullptr;
      return absl::ResourceExhaustedError(absl::StrCat("pinned host memory: cannot allocate ",
                                                       bytes, " bytes: ", cudaGetErrorString(e)));
    }
    capacity_ = bytes;
    return absl::OkStatus();
  }

  // Copies `bytes` from `host` into the buffer, then to `device` on `stream`. The buffer must
  // not be rewritten before the stream ran the copy: callers reuse it only after they
  // synchronized with the stream again.
  absl::Status CopyToDevice(void* device, const void* host, size_t bytes, cudaStream_t stream) {
    if (bytes == 0) return absl::OkStatus();
    RETURN_IF_ERROR(Reserve(bytes));
    std::memcpy(data_, host, bytes);
    if (cudaError_t e = cudaMemcpyAsync(device, data_, bytes, cudaMemcpyHostToDevice, stream);
        e != cudaSuccess) {
      return absl::InternalError(absl::StrCat("upload: ", cudaGetErrorString(e)));
    }
    return absl::OkStatus();
  }

  void* data() { return data_; }

 private:
  void* data_ = nullptr;
  size_t capacity_ = 0;
};

}  // namespace moeserve::engine::cuda
