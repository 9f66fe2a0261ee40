// Safetensors files: a memory-mapped reader that validates the header against the file, the
// element types moeserve reads (F32, BF16, F16, F8_E4M3) with their conversions to fp32, and
// an encoder that writes any of them (for exports and tests).
//
// Format: an unsigned 64-bit little-endian header length, a JSON header mapping each tensor's
// name to {dtype, shape, data_offsets: [begin, end)} (offsets relative to the end of the
// header), then the data. Every problem with a file becomes an INVALID_ARGUMENT status that
// names the file and the tensor; nothing is read outside the mapping.
//
// Called by the checkpoint loader at start-up. A SafetensorsFile is immutable once opened and
// safe to read from many threads; the mapping lives as long as any copy of it.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/bf16.h"

namespace moeserve::engine {

enum class DType { kF32, kBF16, kF16, kF8E4M3 };

// "F32", "BF16", "F16", "F8_E4M3".
const char* DTypeName(DType dtype);
int DTypeSize(DType dtype);

// Exact conversions of one element to fp32 (bf16: kernels/bf16.h, the project's one bf16
// conversion, also available here as Bf16ToFloat / FloatToBf16).
using kernels::Bf16ToFloat;
using kernels::FloatToBf16;
float HalfToFloat(uint16_t bits);
float Float8E4M3ToFloat(uint8_t bits);  // the "fn" variant: no infinities, 0x7F/0xFF are NaN

// One tensor's entry in a file: where its bytes are in the mapping.
struct TensorEntry {
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;  // into the mapping; not aligned in general
  size_t num_bytes = 0;
  int64_t num_elements() const;
};

class SafetensorsFile {
 public:
  // Maps `path` and validates its header: NOT_FOUND when the file does not exist,
  // INVALID_ARGUMENT when it is truncated, its header is malformed, a dtype is unsupported, or a
  // tensor's byte range is outside the data or does not match its shape.
  static absl::StatusOr<SafetensorsFile> Open(const std::string& path);

  const std::string& path() const { return path_; }
  const std::map<std::string, TensorEntry>& tensors() const { return tensors_; }

 private:
  struct Mapping;
  std::string path_;
  std::shared_ptr<const Mapping> mapping_;
  std::map<std::string, TensorEntry> tensors_;
};

// The tensor's elements converted to fp32 (exact for every supported dtype).
std::vector<float> ToFloat32(const TensorEntry& tensor);
// Elements [first, first + out.size()) of the tensor converted to fp32; the caller keeps the
// range inside the tensor.
void ToFloat32(const TensorEntry& tensor, int64_t first, std::span<float> out);

// Hands the whole pages inside [begin, begin + bytes) of a file's mapping back to the kernel:
// the process's resident memory drops by them, and a later read faults them in again from the
// page cache or the file. Readers that stream a large checkpoint call it on what they have
// converted, so their resident memory does not grow with the model.
void ReleaseMappedPages(const uint8_t* begin, size_t bytes);

// A tensor to encode: raw little-endian bytes of `dtype` elements.
struct EncodedTensor {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  std::string bytes;
};

// The bytes of a safetensors file holding `tensors` in the given order.
std::string EncodeSafetensors(const std::vector<EncodedTensor>& tensors);

}  // namespace moeserve::engine
