#include "engine/model/safetensors.h"

#include <sys/mman.h>
#include <unistd.h>

#include <array>
#include <bit>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <limits>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/bounded_json.h"
#include "base/regular_file.h"
#include "engine/base/status_macros.h"
#include "nlohmann/json.hpp"

namespace moeserve::engine {

// The file's read-only mapping; unmapped when the last SafetensorsFile copy goes away.
struct SafetensorsFile::Mapping {
  const uint8_t* data = nullptr;
  size_t size = 0;
  ~Mapping() {
    if (data != nullptr) munmap(const_cast<uint8_t*>(data), size);
  }
};

namespace {

// The format's own limit on the header (100 MB); anything larger is not a safetensors file.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

absl::Status Invalid(const std::string& path, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("safetensors `", path, "`: ", what));
}

bool ParseDType(const std::string& name, DType* dtype) {
  for (DType candidate : {DType::kF32, DType::kBF16, DType::kF16, DType::kF8E4M3}) {
    if (DTypeName(candidate) == name) {
      *dtype = candidate;
      return true;
    }
  }
  return false;
}

// Validates one header entry and fills `entry` with its place in `data` (`data_size` bytes).
absl::Status ParseEntry(const std::string& path, const std::string& name,
                        const nlohmann::json& info, const uint8_t* data, uint64_t data_size,
                        TensorEntry* entry) {
  const std::string where = absl::StrCat("tensor `", name, "`");
  if (!info.is_object()) return Invalid(path, absl::StrCat(where, ": entry is not an object"));
  auto dtype = info.find("dtype");
  auto shape = info.find("shape");
  auto offsets = info.find("data_offsets");
  if (dtype == info.end() || !dtype->is_string() || shape == info.end() || !shape->is_array() ||
      offsets == info.end() || !offsets->is_array()) {
    return Invalid(path, absl::StrCat(where,
                                      ": needs `dtype` (string), `shape` and "
                                      "`data_offsets` (arrays)"));
  }
  if (!ParseDType(dtype->get<std::string>(), &entry->dtype)) {
    return Invalid(path, absl::StrCat(where, " has unsupported dtype `", dtype->get<std::string>(),
                                      "` (supported: F32, BF16, F16, F8_E4M3)"));
  }
  // Element count with an overflow check: the product must fit the data anyway.
  uint64_t elements = 1;
  bool overflow = false;
  for (const nlohmann::json& dim : *shape) {
    if (!dim.is_number_unsigned()) {
      return Invalid(path,
                     absl::StrCat(where, ": shape entries must be non-negative integers, got ",
                                  shape->dump()));
    }
    const uint64_t size = dim.get<uint64_t>();
    if (size > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) overflow = true;
    if (size != 0 && elements > std::numeric_limits<uint64_t>::max() / size) overflow = true;
    if (!overflow) elements *= size;
    entry->shape.push_back(static_cast<int64_t>(
        std::min<uint64_t>(size, static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))));
  }
  if (offsets->size() != 2 || !(*offsets)[0].is_number_unsigned() ||
      !(*offsets)[1].is_number_unsigned()) {
    return Invalid(path, absl::StrCat(where,
                                      ": `data_offsets` must be two non-negative integers, "
                                      "got ",
                                      offsets->dump()));
  }
  const uint64_t begin = (*offsets)[0].get<uint64_t>();
  const uint64_t end = (*offsets)[1].get<uint64_t>();
  if (begin > end) {
    return Invalid(path, absl::StrCat(where, ": `data_offsets` [", begin, ", ", end,
                                      ") ends before it begins"));
  }
  if (end > data_size) {
    return Invalid(path, absl::StrCat(where, ": data [", begin, ", ", end, ") lies outside the ",
                                      data_size, " bytes of data (truncated file?)"));
  }
  const uint64_t element_size = static_cast<uint64_t>(DTypeSize(entry->dtype));
  if (overflow || elements > std::numeric_limits<uint64_t>::max() / element_size ||
      elements * element_size != end - begin) {
    return Invalid(path, absl::StrCat(where, ": shape [", absl::StrJoin(entry->shape, ", "),
                                      "] of ", DTypeName(entry->dtype), " does not match its ",
                                      end - begin, " bytes of data"));
  }
  entry->data = data + begin;
  entry->num_bytes = end - begin;
  return absl::OkStatus();
}

void AppendLittleEndian64(std::string& out, uint64_t value) {
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((value >> (8 * i)) & 0xFF));
}

}  // namespace

const char* DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return "F32";
    case DType::kBF16:
      return "BF16";
    case DType::kF16:
      return "F16";
    case DType::kF8E4M3:
      return "F8_E4M3";
  }
  return "?";
}

int DTypeSize(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return 4;
    case DType::kBF16:
      return 2;
    case DType::kF16:
      return 2;
    case DType::kF8E4M3:
      return 1;
  }
  return 1;
}

float HalfToFloat(uint16_t bits) {
  const float sign = (bits & 0x8000) != 0 ? -1.0f : 1.0f;
  const int exponent = (bits >> 10) & 0x1F;
  const int mantissa = bits & 0x3FF;
  if (exponent == 0) return sign * std::ldexp(static_cast<float>(mantissa), -24);  // subnormal
  if (exponent == 31) {
    return mantissa == 0 ? sign * std::numeric_limits<float>::infinity()
                         : std::numeric_limits<float>::quiet_NaN();
  }
  return sign * std::ldexp(static_cast<float>(mantissa + 1024), exponent - 25);
}

float Float8E4M3ToFloat(uint8_t bits) {
  const float sign = (bits & 0x80) != 0 ? -1.0f : 1.0f;
  const int exponent = (bits >> 3) & 0xF;
  const int mantissa = bits & 0x7;
  if (exponent == 0xF && mantissa == 0x7) return std::numeric_limits<float>::quiet_NaN();
  if (exponent == 0) return sign * std::ldexp(static_cast<float>(mantissa), -9);  // subnormal
  return sign * std::ldexp(static_cast<float>(mantissa + 8), exponent - 10);
}

int64_t TensorEntry::num_elements() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

absl::StatusOr<SafetensorsFile> SafetensorsFile::Open(const std::string& path) {
  absl::StatusOr<base::RegularFile> opened = base::RegularFile::Open(path);
  if (!opened.ok()) {
    return absl::Status(opened.status().code(),
                        absl::StrCat("safetensors ", opened.status().message()));
  }
  const uint64_t size = opened->size();
  if (size < 8) {
    return Invalid(path, absl::StrCat("only ", size,
                                      " bytes, less than the 8-byte header length "
                                      "(truncated or not a safetensors file)"));
  }
  void* address = mmap(nullptr, size, PROT_READ, MAP_PRIVATE, opened->fd(), 0);
  if (address == MAP_FAILED)
    return Invalid(path, absl::StrCat("mmap failed: ", std::strerror(errno)));
  auto mapping = std::make_shared<Mapping>();
  mapping->data = static_cast<const uint8_t*>(address);
  mapping->size = size;

  uint64_t header_size = 0;
  for (int i = 7; i >= 0; --i) header_size = (header_size << 8) | mapping->data[i];
  if (header_size > size - 8 || header_size > kMaxHeaderBytes) {
    return Invalid(path, absl::StrCat("header length ", header_size, " exceeds the file's ", size,
                                      " bytes (truncated or not a safetensors file)"));
  }
  const char* header_begin = reinterpret_cast<const char*>(mapping->data + 8);
  absl::StatusOr<nlohmann::json> parsed =
      base::ParseBoundedJson(std::string_view(header_begin, header_size));
  if (!parsed.ok()) {
    return Invalid(path, absl::StrCat("the header is not a JSON object (corrupt or not a "
                                      "safetensors file): ",
                                      parsed.status().message()));
  }
  const nlohmann::json& header = *parsed;
  if (!header.is_object()) {
    return Invalid(path, "the header is not a JSON object (corrupt or not a safetensors file)");
  }
  SafetensorsFile file;
  file.path_ = path;
  const uint8_t* data = mapping->data + 8 + header_size;
  const uint64_t data_size = size - 8 - header_size;
  for (const auto& [name, entry_json] : header.items()) {
    if (name == "__metadata__") continue;
    TensorEntry entry;
    RETURN_IF_ERROR(ParseEntry(path, name, entry_json, data, data_size, &entry));
    file.tensors_.emplace(name, std::move(entry));
  }
  file.mapping_ = std::move(mapping);
  return file;
}

std::vector<float> ToFloat32(const TensorEntry& tensor) {
  std::vector<float> out(tensor.num_bytes / static_cast<size_t>(DTypeSize(tensor.dtype)));
  ToFloat32(tensor, 0, out);
  return out;
}

void ToFloat32(const TensorEntry& tensor, int64_t first, std::span<float> out) {
  const size_t count = out.size();
  const uint8_t* bytes = tensor.data + static_cast<size_t>(first) * DTypeSize(tensor.dtype);
  switch (tensor.dtype) {
    case DType::kF32:
      // An empty tensor's vector may have no storage, and memcpy from or to null is undefined
      // even for zero bytes.
      if (count > 0) std::memcpy(out.data(), bytes, count * sizeof(float));
      break;
    case DType::kBF16:
    case DType::kF16:
      for (size_t i = 0; i < count; ++i) {
        const uint16_t bits = static_cast<uint16_t>(bytes[2 * i] | (bytes[2 * i + 1] << 8));
        out[i] = tensor.dtype == DType::kBF16 ? Bf16ToFloat(bits) : HalfToFloat(bits);
      }
      break;
    case DType::kF8E4M3: {
      static const std::array<float, 256> table = [] {
        std::array<float, 256> values;
        for (int b = 0; b < 256; ++b) values[b] = Float8E4M3ToFloat(static_cast<uint8_t>(b));
        return values;
      }();
      for (size_t i = 0; i < count; ++i) out[i] = table[bytes[i]];
      break;
    }
  }
}

void ReleaseMappedPages(const uint8_t* begin, size_t bytes) {
  static const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t first = (reinterpret_cast<uintptr_t>(begin) + page - 1) / page * page;
  const uintptr_t end = (reinterpret_cast<uintptr_t>(begin) + bytes) / page * page;
  // Advice only: a failure leaves the pages resident, which is still correct.
  if (end > first) madvise(reinterpret_cast<void*>(first), end - first, MADV_DONTNEED);
}

std::string EncodeSafetensors(const std::vector<EncodedTensor>& tensors) {
  nlohmann::json header = nlohmann::json::object();
  uint64_t offset = 0;
  for (const EncodedTensor& tensor : tensors) {
    header[tensor.name] = {{"dtype", std::string(DTypeName(tensor.dtype))},
                           {"shape", tensor.shape},
                           {"data_offsets", {offset, offset + tensor.bytes.size()}}};
    offset += tensor.bytes.size();
  }
  std::string header_text = header.dump();
  while (header_text.size() % 8 != 0) header_text.push_back(' ');
  std::string out;
  AppendLittleEndian64(out, header_text.size());
  out += header_text;
  for (const EncodedTensor& tensor : tensors) out += tensor.bytes;
  return out;
}

}  // namespace moeserve::engine
