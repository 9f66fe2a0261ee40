// TensorSource: where a model's weights are read from, by canonical Hugging Face name and in
// element ranges, converted to the type the reader computes in. Two sources exist: the fp32
// tensors of a ModelWeights in memory (built-in models, the CPU engine), and a checkpoint's
// memory-mapped files read on demand (engine/model/checkpoint.h), so that a GPU rank reads only
// the dense weights and the experts of its own slots, chunk by chunk, with no host copy of the
// model.
//
// Implementations are immutable after construction; every method is safe to call from many
// threads at once.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"

namespace moeserve::engine {

class TensorSource {
 public:
  virtual ~TensorSource() = default;

  // The canonical tensor's shape, or null when the source does not hold it.
  virtual const std::vector<int64_t>* Shape(const std::string& name) const = 0;
  // Elements [first, first + out.size()) of `name` in row-major order, as fp32 or as bf16 bits
  // (round to nearest even). NOT_FOUND for a name the source does not hold, OUT_OF_RANGE for a
  // range outside the tensor, INVALID_ARGUMENT for a stored value that is not finite (a corrupt
  // checkpoint).
  virtual absl::Status ReadFloat(const std::string& name, int64_t first,
                                 std::span<float> out) const = 0;
  virtual absl::Status ReadBf16(const std::string& name, int64_t first,
                                std::span<uint16_t> out) const = 0;

  // FP8 as stored (DeepSeek-V3's checkpoints): whether `name` is a 2-D e4m3 tensor with one
  // fp32 scale per 128 x 128 block (value = code * scale), which a GPU computes with as it is.
  virtual bool StoredAsFp8Blocks(const std::string& name) const {
    (void)name;
    return false;
  }
  // Its e4m3 codes, elements [first, first + out.size()) row-major, and its block scales
  // [ceil(rows / 128), ceil(cols / 128)] row-major. FAILED_PRECONDITION when the tensor is not
  // stored so; otherwise the errors of ReadFloat (a scale that is not finite is corrupt).
  virtual absl::Status ReadFp8Codes(const std::string& name, int64_t first,
                                    std::span<uint8_t> out) const;
  virtual absl::Status ReadFp8Scales(const std::string& name, std::span<float> out) const;
};

// Calls read(begin, end) over ranges that split [0, count), on several threads when the count
// is large (a staging chunk of tens of MB converts and faults its pages in at the speed of
// several cores; small counts stay on the caller's thread). The first range's error first.
absl::Status ReadInParallel(int64_t count,
                            const std::function<absl::Status(int64_t begin, int64_t end)>& read);
// ReadBf16 through ReadInParallel.
absl::Status ReadBf16InParallel(const TensorSource& source, const std::string& name, int64_t first,
                                std::span<uint16_t> out);

// The number of elements of a shape.
int64_t NumElements(const std::vector<int64_t>& shape);

}  // namespace moeserve::engine
