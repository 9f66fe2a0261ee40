#include "engine/backend/cuda/weight_uploader.h"

#include <algorithm>
#include <vector>

#include "absl/strings/str_cat.h"
#include "base/load_progress.h"
#include "engine/base/status_macros.h"
#include "kernels/fp8.h"
#include "kernels/kernels.h"

namespace moeserve::engine::cuda {
namespace {

// Bytes per staging chunk: large enough that a copy runs at bus speed and the conversion
// spreads over many threads, small enough that two stay a small fixed cost.
constexpr int64_t kChunkBytes = int64_t{32} << 20;

absl::Status NotFound(const std::string& name) {
  return absl::NotFoundError(absl::StrCat("the model's weights hold no tensor `", name, "`"));
}

}  // namespace

WeightUploader::WeightUploader(const TensorSource& source, cudaStream_t stream)
    : source_(source), stream_(stream) {}

WeightUploader::~WeightUploader() {
  // The chunks' last copies must be done before their memory goes (a chunk in use has an
  // event, whether or not its copy was counted).
  if (copied_[0] != nullptr || copied_[1] != nullptr) cudaStreamSynchronize(stream_);
  for (cudaEvent_t event : copied_) {
    if (event != nullptr) cudaEventDestroy(event);
  }
}

absl::Status WeightUploader::CopyThroughChunks(
    void* device, int64_t bytes,
    const std::function<absl::Status(int64_t offset, void* staged, int64_t count)>& fill) {
  base::LoadProgress& progress = base::LoadProgress::Global();
  for (int64_t offset = 0; offset < bytes; offset += kChunkBytes) {
    const int64_t count = std::min(kChunkBytes, bytes - offset);
    const int c = next_chunk_;
    next_chunk_ = (next_chunk_ + 1) % kChunks;
    if (copied_[c] == nullptr) {
      // The chunk first: an event exists only for a chunk that does.
      RETURN_IF_ERROR(chunks_[c].Reserve(kChunkBytes));
      RETURN_IF_ERROR(kernels::CudaStatus(
          cudaEventCreateWithFlags(&copied_[c], cudaEventDisableTiming), "upload event"));
    } else {
      // The chunk's previous copy must have left it before it is refilled.
      RETURN_IF_ERROR(kernels::CudaStatus(cudaEventSynchronize(copied_[c]), "weight upload"));
    }
    RETURN_IF_ERROR(fill(offset, chunks_[c].data(), count));
    RETURN_IF_ERROR(
        kernels::CudaStatus(cudaMemcpyAsync(static_cast<char*>(device) + offset, chunks_[c].data(),
                                            count, cudaMemcpyHostToDevice, stream_),
                            "weight upload"));
    RETURN_IF_ERROR(kernels::CudaStatus(cudaEventRecord(copied_[c], stream_), "upload event"));
    uploaded_bytes_ += count;
    progress.Advance(count);
  }
  return absl::OkStatus();
}

absl::Status WeightUploader::Upload(kernels::DeviceArray<__nv_bfloat16>& out,
                                    std::initializer_list<std::string> names) {
  int64_t total = 0;
  std::vector<int64_t> sizes;
  for (const std::string& name : names) {
    const std::vector<int64_t>* shape = source_.Shape(name);
    if (shape == nullptr) return NotFound(name);
    sizes.push_back(NumElements(*shape));
    total += sizes.back();
  }
  RETURN_IF_ERROR(out.Reserve(static_cast<size_t>(total)));
  int64_t offset = 0;
  size_t part = 0;
  for (const std::string& name : names) {
    const int64_t size = sizes[part++];
    RETURN_IF_ERROR(CopyThroughChunks(
        out.data() + offset, size * 2, [&](int64_t byte_offset, void* staged, int64_t count) {
          return ReadBf16InParallel(
              source_, name, byte_offset / 2,
              std::span<uint16_t>(static_cast<uint16_t*>(staged), static_cast<size_t>(count / 2)));
        }));
    offset += size;
  }
  return kernels::CudaStatus(cudaStreamSynchronize(stream_), "weight upload");
}

absl::Status WeightUploader::UploadFloat(kernels::DeviceArray<float>& out,
                                         const std::string& name) {
  const std::vector<int64_t>* shape = source_.Shape(name);
  if (shape == nullptr) return NotFound(name);
  std::vector<float> values(NumElements(*shape));
  RETURN_IF_ERROR(source_.ReadFloat(name, 0, values));
  uploaded_bytes_ += values.size() * sizeof(float);
  return out.Upload(values.data(), values.size(), stream_);
}

absl::StatusOr<std::vector<int64_t>> WeightUploader::Shape2D(const std::string& name) const {
  const std::vector<int64_t>* shape = source_.Shape(name);
  if (shape == nullptr) return NotFound(name);
  if (!source_.StoredAsFp8Blocks(name) || shape->size() != 2) {
    return absl::FailedPreconditionError(absl::StrCat(
        "tensor `", name,
        "` is not stored as FP8 with 128x128 block scales, as the other "
        "experts are: the checkpoint mixes precisions; serve it with --gpu-expert-weights bf16"));
  }
  return *shape;
}

absl::Status WeightUploader::UploadFp8(kernels::DeviceArray<__nv_fp8_e4m3>& codes,
                                       kernels::DeviceArray<float>& scales,
                                       std::initializer_list<std::string> names) {
  using kernels::kFp8BlockSize;
  int64_t rows = 0, cols = -1;
  size_t part = 0;
  for (const std::string& name : names) {
    ASSIGN_OR_RETURN(std::vector<int64_t> shape, Shape2D(name));
    if (cols >= 0 && shape[1] != cols) {
      return absl::InvalidArgumentError(absl::StrCat("FP8 tensor `", name, "` is ", shape[1],
                                                     " wide; the tensors stacked with it are ",
                                                     cols));
    }
    if (++part < names.size() && shape[0] % kFp8BlockSize != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("FP8 tensor `", name, "` has ", shape[0],
                       " rows, not a multiple of 128: its block scales cannot be stacked"));
    }
    cols = shape[1];
    rows += shape[0];
  }
  const int64_t stride = kernels::WeightScaleStride(cols);
  std::vector<float> stacked_scales(kernels::WeightScaleCount(rows, cols), 0.0f);
  RETURN_IF_ERROR(codes.Reserve(static_cast<size_t>(rows * cols)));
  int64_t row = 0;
  for (const std::string& name : names) {
    const int64_t part_rows = source_.Shape(name)->at(0);
    const int64_t block_rows = kernels::Fp8Blocks(part_rows), block_cols = kernels::Fp8Blocks(cols);
    std::vector<float> part_scales(block_rows * block_cols);
    RETURN_IF_ERROR(source_.ReadFp8Scales(name, part_scales));
    for (int64_t r = 0; r < block_rows; ++r) {
      std::copy_n(part_scales.begin() + r * block_cols, block_cols,
                  stacked_scales.begin() + (row / kFp8BlockSize + r) * stride);
    }
    RETURN_IF_ERROR(CopyThroughChunks(
        reinterpret_cast<uint8_t*>(codes.data()) + row * cols, part_rows * cols,
        [&](int64_t offset, void* staged, int64_t count) {
          auto* bytes = static_cast<uint8_t*>(staged);
          return ReadInParallel(count, [&](int64_t begin, int64_t end) {
            return source_.ReadFp8Codes(name, offset + begin,
                                        std::span<uint8_t>(bytes + begin, end - begin));
          });
        }));
    row += part_rows;
  }
  uploaded_bytes_ += stacked_scales.size() * sizeof(float);
  return scales.Upload(stacked_scales.data(), stacked_scales.size(), stream_);
}

}  // namespace moeserve::engine::cuda
