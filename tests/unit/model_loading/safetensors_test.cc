// The safetensors reader: element conversions against values worked out from the formats'
// definitions, and every way a file can be broken (each must give INVALID_ARGUMENT or
// NOT_FOUND naming the file and the problem, never a crash).
#include "engine/model/safetensors.h"

#include <cmath>
#include <filesystem>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/unit/model_loading/checkpoint_test_util.h"

namespace moeserve::engine {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using testing::MakeTempFolder;
using testing::WriteText;

TEST(Conversions, Bfloat16IsTheTopHalfOfAFloat) {
  EXPECT_EQ(Bf16ToFloat(0x3F80), 1.0f);
  EXPECT_EQ(Bf16ToFloat(0xC040), -3.0f);
  EXPECT_EQ(Bf16ToFloat(0x3E20), 0.15625f);
  EXPECT_EQ(FloatToBf16(1.0f), 0x3F80);
  // 1 + 2^-8 is halfway between two BF16 values: ties go to the even mantissa (1.0).
  EXPECT_EQ(FloatToBf16(1.0f + std::ldexp(1.0f, -8)), 0x3F80);
  EXPECT_EQ(FloatToBf16(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3F82);
}

TEST(Conversions, HalfPrecisionIncludingSubnormalsAndInfinity) {
  EXPECT_EQ(HalfToFloat(0x3C00), 1.0f);
  EXPECT_EQ(HalfToFloat(0xC000), -2.0f);
  EXPECT_EQ(HalfToFloat(0x3555), 0.25f * (1 + 341 / 1024.0f));   // exponent 13, mantissa 341
  EXPECT_EQ(HalfToFloat(0x7BFF), 65504.0f);                      // largest normal
  EXPECT_EQ(HalfToFloat(0x0001), std::ldexp(1.0f, -24));         // smallest subnormal
  EXPECT_EQ(HalfToFloat(0x03FF), 1023 * std::ldexp(1.0f, -24));  // largest subnormal
  EXPECT_TRUE(std::isinf(HalfToFloat(0x7C00)));
  EXPECT_TRUE(std::isnan(HalfToFloat(0x7E00)));
  EXPECT_TRUE(std::signbit(HalfToFloat(0x8000)));
}

TEST(Conversions, Float8E4M3FnEveryCode) {
  // e4m3fn: bias 7, no infinities; S.1111.111 is NaN; the largest finite value is 448.
  EXPECT_EQ(Float8E4M3ToFloat(0x38), 1.0f);    // exponent 7, mantissa 0
  EXPECT_EQ(Float8E4M3ToFloat(0x3C), 1.5f);    // mantissa 4/8
  EXPECT_EQ(Float8E4M3ToFloat(0x7E), 448.0f);  // exponent 15, mantissa 6: 1.75 * 2^8
  EXPECT_EQ(Float8E4M3ToFloat(0xFE), -448.0f);
  EXPECT_EQ(Float8E4M3ToFloat(0x01), std::ldexp(1.0f, -9));  // smallest subnormal: 1/8 * 2^-6
  EXPECT_EQ(Float8E4M3ToFloat(0x08), std::ldexp(1.0f, -6));  // smallest normal
  EXPECT_TRUE(std::isnan(Float8E4M3ToFloat(0x7F)));
  EXPECT_TRUE(std::isnan(Float8E4M3ToFloat(0xFF)));
  // Every other code: (-1)^s * 2^(e-7) * (1 + m/8), or 2^-6 * m/8 when e = 0.
  for (int code = 0; code < 256; ++code) {
    if ((code & 0x7F) == 0x7F) continue;
    const int e = (code >> 3) & 0xF, m = code & 7;
    const double magnitude = e == 0 ? std::ldexp(m / 8.0, -6) : std::ldexp(1.0 + m / 8.0, e - 7);
    EXPECT_EQ(Float8E4M3ToFloat(static_cast<uint8_t>(code)),
              static_cast<float>((code & 0x80) ? -magnitude : magnitude))
        << code;
  }
}

std::string TwoTensorFile() {
  EncodedTensor a{"a", DType::kF32, {2, 2}, std::string(16, '\0')};
  EncodedTensor b{"b", DType::kBF16, {3}, std::string("\x80\x3f\x00\x40\x40\xc0", 6)};
  return EncodeSafetensors({a, b});
}

TEST(SafetensorsFile, ReadsWhatEncodeWrites) {
  const fs::path file = MakeTempFolder("ok") / "x.safetensors";
  WriteText(file, TwoTensorFile());
  absl::StatusOr<SafetensorsFile> opened = SafetensorsFile::Open(file.string());
  ASSERT_TRUE(opened.ok()) << opened.status();
  ASSERT_EQ(opened->tensors().size(), 2u);
  const TensorEntry& b = opened->tensors().at("b");
  EXPECT_EQ(b.dtype, DType::kBF16);
  EXPECT_EQ(b.shape, std::vector<int64_t>{3});
  EXPECT_EQ(ToFloat32(b), (std::vector<float>{1.0f, 2.0f, -3.0f}));
}

absl::Status OpenBytes(const std::string& bytes) {
  const fs::path file = MakeTempFolder("bad") / "x.safetensors";
  WriteText(file, bytes);
  absl::StatusOr<SafetensorsFile> opened = SafetensorsFile::Open(file.string());
  return opened.ok() ? absl::OkStatus() : opened.status();
}

std::string WithHeader(const std::string& header, size_t data_bytes) {
  std::string out;
  const uint64_t size = header.size();
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((size >> (8 * i)) & 0xFF));
  return out + header + std::string(data_bytes, '\0');
}

void ExpectInvalid(const std::string& bytes, const std::string& message) {
  const absl::Status status = OpenBytes(bytes);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  EXPECT_THAT(status.message(), HasSubstr(message));
  EXPECT_THAT(status.message(), HasSubstr("x.safetensors"));
}

TEST(SafetensorsFile, MissingFileIsNotFound) {
  absl::StatusOr<SafetensorsFile> opened =
      SafetensorsFile::Open((MakeTempFolder("none") / "absent.safetensors").string());
  EXPECT_EQ(opened.status().code(), absl::StatusCode::kNotFound);
}

TEST(SafetensorsFile, TruncatedFiles) {
  ExpectInvalid("", "only 0 bytes");
  ExpectInvalid("abc", "only 3 bytes");
  const std::string whole = TwoTensorFile();
  // Cut inside the header: the header length now exceeds the file.
  ExpectInvalid(whole.substr(0, 20), "exceeds the file");
  // Cut inside the data: tensor `b`'s bytes lie past the end.
  ExpectInvalid(whole.substr(0, whole.size() - 2), "lies outside");
}

TEST(SafetensorsFile, BadHeaders) {
  ExpectInvalid(WithHeader("{not json", 0), "not a JSON object");
  ExpectInvalid(WithHeader("[1, 2]", 0), "not a JSON object");
  ExpectInvalid(WithHeader(R"({"t": 3})", 0), "entry is not an object");
  ExpectInvalid(WithHeader(R"({"t": {"shape": [1], "data_offsets": [0, 4]}})", 4), "needs `dtype`");
  ExpectInvalid(WithHeader(R"({"t": {"dtype": "I32", "shape": [1], "data_offsets": [0, 4]}})", 4),
                "unsupported dtype `I32`");
  ExpectInvalid(WithHeader(R"({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}})", 4),
                "non-negative");
  ExpectInvalid(WithHeader(R"({"t": {"dtype": "F32", "shape": [1], "data_offsets": [4]}})", 4),
                "two non-negative integers");
  ExpectInvalid(WithHeader(R"({"t": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}})", 4),
                "ends before it begins");
  // Offsets out of bounds, and a size that does not match the shape.
  ExpectInvalid(WithHeader(R"({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})", 4),
                "lies outside");
  ExpectInvalid(WithHeader(R"({"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}})", 8),
                "does not match");
  // Element counts whose byte size overflows 64 bits are a mismatch, not a wrap-around.
  ExpectInvalid(
      WithHeader(
          R"({"t": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 0]}})",
          0),
      "does not match");
  // A header length larger than any real header.
  std::string huge(8, '\xff');
  ExpectInvalid(huge + "{}", "exceeds the file");
}

TEST(SafetensorsFile, MetadataIsIgnored) {
  const std::string bytes = WithHeader(
      R"({"__metadata__": {"format": "pt"}, "t": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}})",
      4);
  EXPECT_TRUE(OpenBytes(bytes).ok());
}

}  // namespace
}  // namespace moeserve::engine
