// PinnedBuffer: growable page-locked host memory, for copies between host and GPU that must
// not wait for the stream on the host (a copy from pageable memory is staged synchronously)
// and that run at full bus speed (the step's logits). Not thread-safe; not copyable. Uses the
// CUDA device current when CopyToDevice is first called.
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
    if (copied_ != nullptr) cudaEventDestroy(copied_);
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

  // Copies `bytes` from `host` into the buffer, then to `device` on `stream`, without waiting
  // for the copy. The buffer is rewritten only once the previous such copy ran (an event, waited
  // on here), so callers need not synchronize with the stream between uploads: a rank with no
  // tokens of its own uploads received rows' orders layer after layer without a sync between.
  absl::Status CopyToDevice(void* device, const void* host, size_t bytes, cudaStream_t stream) {
    if (bytes == 0) return absl::OkStatus();
    if (copied_ != nullptr) {
      if (cudaError_t e = cudaEventSynchronize(copied_); e != cudaSuccess) {
        return absl::InternalError(absl::StrCat("upload: ", cudaGetErrorString(e)));
      }
    } else if (cudaError_t e = cudaEventCreateWithFlags(&copied_, cudaEventDisableTiming);
               e != cudaSuccess) {
      copied_ = nullptr;
      return absl::InternalError(absl::StrCat("upload event: ", cudaGetErrorString(e)));
    }
    RETURN_IF_ERROR(Reserve(bytes));
    std::memcpy(data_, host, bytes);
    if (cudaError_t e = cudaMemcpyAsync(device, data_, bytes, cudaMemcpyHostToDevice, stream);
        e != cudaSuccess) {
      return absl::InternalError(absl::StrCat("upload: ", cudaGetErrorString(e)));
    }
    if (cudaError_t e = cudaEventRecord(copied_, stream); e != cudaSuccess) {
      return absl::InternalError(absl::StrCat("upload event: ", cudaGetErrorString(e)));
    }
    return absl::OkStatus();
  }

  void* data() { return data_; }

 private:
  void* data_ = nullptr;
  size_t capacity_ = 0;
  cudaEvent_t copied_ = nullptr;  // the last CopyToDevice's copy (created by the first one)
};

}  // namespace moeserve::engine::cuda
