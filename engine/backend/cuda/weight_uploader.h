// WeightUploader: a model's tensors, by canonical name, from its TensorSource (a checkpoint's
// mapped files, or the host weights of a built-in model) into device arrays — as bf16, or as
// stored for FP8 checkpoints (e4m3 codes and 128x128 block scales, kernels/fp8.h's layout).
// Values pass through two pinned staging chunks: the host converts the next chunk (on several
// threads) while the copy engine moves the last one, so a rank's host memory for its weights is
// the two chunks, whatever the model's size, and it reads only the tensors it uploads.
//
// One uploader belongs to one thread (a rank's, or its group's staging thread) and copies on
// the stream it was given; its pinned chunks are freed with it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <array>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <string>

#include "absl/status/status.h"
#include "engine/backend/cuda/pinned_buffer.h"
#include "engine/model/tensor_source.h"
#include "kernels/device_array.h"

namespace moeserve::engine::cuda {

class WeightUploader {
 public:
  WeightUploader(const TensorSource& source, cudaStream_t stream);
  ~WeightUploader();
  WeightUploader(const WeightUploader&) = delete;
  WeightUploader& operator=(const WeightUploader&) = delete;

  // The named tensors, concatenated in order, as bf16 into `out` (grown to fit); returns once
  // they are on the device. NOT_FOUND names a tensor the source does not hold.
  absl::Status Upload(kernels::DeviceArray<__nv_bfloat16>& out,
                      std::initializer_list<std::string> names);
  // One tensor as fp32 (small tensors: the gate's correction bias).
  absl::Status UploadFloat(kernels::DeviceArray<float>& out, const std::string& name);
  // FP8 tensors of the same width stacked by rows, as stored: codes [sum of rows, cols] and
  // block scales [Fp8Blocks(sum of rows)][WeightScaleStride(cols)] (kernels/fp8.h).
  // FAILED_PRECONDITION for a tensor not stored as FP8 blocks, INVALID_ARGUMENT for widths that
  // differ or a part (but the last) whose rows are not a multiple of 128.
  absl::Status UploadFp8(kernels::DeviceArray<__nv_fp8_e4m3>& codes,
                         kernels::DeviceArray<float>& scales,
                         std::initializer_list<std::string> names);

  // Bytes copied to the device so far.
  uint64_t uploaded_bytes() const { return uploaded_bytes_; }

 private:
  // Copies `bytes` to `device` chunk by chunk; `fill(offset, staged, count)` writes bytes
  // [offset, offset + count) into the pinned chunk first.
  absl::Status CopyThroughChunks(
      void* device, int64_t bytes,
      const std::function<absl::Status(int64_t offset, void* staged, int64_t count)>& fill);
  absl::StatusOr<std::vector<int64_t>> Shape2D(const std::string& name) const;

  static constexpr int kChunks = 2;
  const TensorSource& source_;
  cudaStream_t stream_;
  std::array<PinnedBuffer, kChunks> chunks_;
  std::array<cudaEvent_t, kChunks> copied_{};  // each chunk's last copy, before it is refilled
  int next_chunk_ = 0;
  uint64_t uploaded_bytes_ = 0;
};

}  // namespace moeserve::engine::cuda
