// DeepSeek-V3's block-scaled FP8 recipe on the GPU (kernels/fp8_*.h) against its CPU twins
// (kernels/fp8_twins.h): quantization bit for bit, the cuBLASLt block-scaled GEMM and the FP8
// expert MLP within tolerances derived below. Skipped where no GPU is present.
//
// Tolerances. The GPU and the twin quantize the activations identically (asserted bit for bit),
// so the GEMM sees the same e4m3 operands and scales on both sides; what differs is the order of
// the fp32 sums and the bf16 rounding of the output (2^-9 of a value), hence max |diff| / max
// |ref| < 1e-2. In the MLP the GPU's bf16 gate/up outputs may differ from the twin's in the last
// bit, and a changed bf16 input can move an activation to the neighbouring e4m3 value (1/8 of
// its magnitude at most) or change a tile's amax; such changes are rare and average out over the
// 128..2048-long dot products, hence max |diff| / max |ref| < 3e-2 and rms relative < 1e-2.
// Against the same MLP without activation quantization (bf16 activations, the same dequantized
// weights), the difference is the recipe's own error: e4m3 keeps 3 mantissa bits, a relative
// rounding error of at most 2^-4 and about 2.5% rms per element; the MLP quantizes twice (x,
// then the SwiGLU output), so we expect 3-5% rms and assert < 8%.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/bf16.h"
#include "kernels/fp8.h"
#include "kernels/fp8_expert_mlp.h"
#include "kernels/fp8_gemm.h"
#include "kernels/fp8_grouped_gemm.h"
#include "kernels/fp8_linear.h"
#include "kernels/fp8_quantize.h"
#include "kernels/fp8_twins.h"
#include "tests/gpu/device_copies.h"

namespace moeserve::kernels {
namespace {

using testing::DeviceMemory;
using testing::RandomBf16;

template <typename T, typename D>
std::vector<T> Download(const D* device, size_t count) {
  std::vector<T> host(count);
  EXPECT_EQ(cudaMemcpy(host.data(), device, count * sizeof(T), cudaMemcpyDeviceToHost),
            cudaSuccess);
  return host;
}

struct Errors {
  double max_over_max = 0;  // max |a - b| / max |b|
  double rms_relative = 0;  // sqrt(sum (a - b)^2 / sum b^2)
};

Errors Compare(const std::vector<float>& actual, const std::vector<float>& expected) {
  double diff = 0, scale = 0, squared_diff = 0, squared = 0;
  for (size_t i = 0; i < actual.size(); ++i) {
    const double d = std::fabs(static_cast<double>(actual[i]) - expected[i]);
    diff = std::max(diff, d);
    scale = std::max(scale, std::fabs(static_cast<double>(expected[i])));
    squared_diff += d * d;
    squared += static_cast<double>(expected[i]) * expected[i];
  }
  return {scale > 0 ? diff / scale : diff, squared > 0 ? std::sqrt(squared_diff / squared) : 0};
}

std::vector<float> Bf16Floats(const std::vector<uint16_t>& values, size_t count) {
  std::vector<float> floats(count);
  for (size_t i = 0; i < count; ++i) floats[i] = Bf16ToFloat(values[i]);
  return floats;
}

const __nv_bfloat16* AsBf16(const uint16_t* p) { return reinterpret_cast<const __nv_bfloat16*>(p); }
__nv_bfloat16* AsBf16(uint16_t* p) { return reinterpret_cast<__nv_bfloat16*>(p); }
__nv_fp8_e4m3* AsFp8(uint8_t* p) { return reinterpret_cast<__nv_fp8_e4m3*>(p); }

// A block-scaled weight quantized on the host, and its device copy.
struct TestWeight {
  std::vector<uint8_t> values;
  std::vector<float> scales;
  Fp8Weight device;

  Fp8WeightTwin twin() const { return {values.data(), scales.data()}; }
};

TestWeight MakeWeight(int out, int in, unsigned seed, float scale, DeviceMemory& memory) {
  const auto bf16 = RandomBf16(static_cast<size_t>(out) * in, seed, scale);
  TestWeight w;
  w.values.resize(bf16.size());
  w.scales.resize(WeightScaleCount(out, in));
  QuantizeWeightBlocksFp8Twin(bf16.data(), out, in, w.values.data(), w.scales.data());
  w.device.values = AsFp8(memory.Upload(w.values));
  w.device.scales = memory.Upload(w.scales);
  return w;
}

__global__ void ConvertKernel(const float* in, uint8_t* out, int count) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < count) out[i] = __nv_cvt_float_to_fp8(in[i], __NV_SATFINITE, __NV_E4M3);
}

TEST(Fp8Host, EveryE4m3ValueRoundTrips) {
  for (int bits = 0; bits < 256; ++bits) {
    if ((bits & 0x7f) == 0x7f) continue;  // NaN
    const float value = E4m3ToFloat(static_cast<uint8_t>(bits));
    EXPECT_EQ(FloatToE4m3(value), bits) << value;
  }
  EXPECT_EQ(E4m3ToFloat(0x7e), 448.0f);
  EXPECT_EQ(FloatToE4m3(1e9f), 0x7e);  // saturates
  EXPECT_EQ(FloatToE4m3(-500), 0xfe);
  EXPECT_EQ(FloatToE4m3(-std::nanf("")), 0x7f);  // the GPU drops a NaN's sign
}

// The host conversion is the GPU's cvt.rn.satfinite: every value, the midpoints between
// neighbours (ties to even), values just beside them, subnormals and out-of-range ones.
TEST(Fp8Kernels, HostConversionEqualsTheGpus) {
  REQUIRE_GPU();
  std::vector<float> inputs;
  for (int bits = 0; bits < 0x7e; ++bits) {  // up to 448, whose upper neighbour is NaN
    const float a = E4m3ToFloat(static_cast<uint8_t>(bits));
    const float b = E4m3ToFloat(static_cast<uint8_t>(bits + 1));
    for (float v : {a, (a + b) / 2, std::nextafter((a + b) / 2, 0.0f),
                    std::nextafter((a + b) / 2, 1e30f), a * 0.999f + b * 0.001f}) {
      inputs.push_back(v);
      inputs.push_back(-v);
    }
  }
  for (float v :
       {448.0f, 455.9f, 464.0f, 470.0f, 1e6f, 1e-12f, 0.0f, -0.0f, std::nanf(""), -std::nanf("")}) {
    inputs.push_back(v);
  }
  DeviceMemory memory;
  float* in = memory.Upload(inputs);
  uint8_t* out = memory.Allocate<uint8_t>(inputs.size());
  ConvertKernel<<<(inputs.size() + 255) / 256, 256>>>(in, out, static_cast<int>(inputs.size()));
  const auto gpu = Download<uint8_t>(out, inputs.size());
  for (size_t i = 0; i < inputs.size(); ++i) {
    ASSERT_EQ(gpu[i], FloatToE4m3(inputs[i])) << "value " << inputs[i];
  }
}

TEST(Fp8Kernels, ActivationQuantizationMatchesTwinBitForBit) {
  REQUIRE_GPU();
  const int cols = 7168;
  for (int rows : {1, 3, 4, 130}) {
    auto x = RandomBf16(static_cast<size_t>(rows) * cols, 7 + rows, 1.0f);
    // An all-zero tile, and one with a single huge value, take the edge paths.
    std::fill(x.begin(), x.begin() + 128, uint16_t{0});
    x[x.size() - 300] = FloatToBf16(3e4f);
    const int64_t padded = Fp8PaddedRows(rows);
    std::vector<uint8_t> values(padded * cols);
    std::vector<float> scales(ActivationScaleCount(rows, cols));
    QuantizeActivationsFp8Twin(x.data(), rows, cols, values.data(), scales.data());
    DeviceMemory memory;
    uint8_t* device_values = memory.Allocate<uint8_t>(values.size());
    float* device_scales = memory.Allocate<float>(scales.size());
    ASSERT_TRUE(QuantizeActivationsFp8(AsBf16(memory.Upload(x)), rows, cols, AsFp8(device_values),
                                       device_scales, nullptr)
                    .ok());
    EXPECT_EQ(Download<uint8_t>(device_values, values.size()), values) << rows << " rows";
    EXPECT_EQ(Download<float>(device_scales, scales.size()), scales) << rows << " rows";
  }
}

TEST(Fp8Kernels, GroupedQuantizationPadsEachGroupOnItsOwn) {
  REQUIRE_GPU();
  const int cols = 256;
  const std::vector<int64_t> offsets = {0, 1, 1, 6, 10, 139};
  auto groups = MakeFp8RowGroups(offsets);
  ASSERT_TRUE(groups.ok()) << groups.status();
  EXPECT_EQ(groups->padded_rows(), 4 + 0 + 8 + 4 + 132);
  const auto x = RandomBf16(static_cast<size_t>(offsets.back()) * cols, 3, 2.0f);
  DeviceMemory memory;
  uint8_t* values = memory.Allocate<uint8_t>(groups->padded_rows() * cols);
  float* scales = memory.Allocate<float>(groups->padded_rows() * 2);
  ASSERT_TRUE(QuantizeActivationGroupsFp8(AsBf16(memory.Upload(x)), *groups, cols, AsFp8(values),
                                          scales, nullptr)
                  .ok());
  const auto all_values = Download<uint8_t>(values, groups->padded_rows() * cols);
  const auto all_scales = Download<float>(scales, groups->padded_rows() * 2);
  for (int g = 0; g < groups->count; ++g) {
    const int rows = static_cast<int>(groups->rows(g));
    if (rows == 0) continue;
    std::vector<uint8_t> expected_values(Fp8PaddedRows(rows) * cols);
    std::vector<float> expected_scales(ActivationScaleCount(rows, cols));
    QuantizeActivationsFp8Twin(x.data() + offsets[g] * cols, rows, cols, expected_values.data(),
                               expected_scales.data());
    const int64_t start = groups->padded_start[g];
    EXPECT_TRUE(std::equal(expected_values.begin(), expected_values.end(),
                           all_values.begin() + start * cols))
        << "group " << g;
    EXPECT_TRUE(
        std::equal(expected_scales.begin(), expected_scales.end(), all_scales.begin() + start * 2))
        << "group " << g;
  }
}

// The permute into expert order fused into the quantization: grouped row i read from x's row
// source_rows[i] (rows read by several experts, and some by none) gives, bit for bit, what
// quantizing the permuted rows gives, padding rows included.
// Device buffers for one quantization of `groups` (codes and 1 x 128 scales), filled with 0x55
// so that whatever a kernel leaves unwritten shows when two are compared.
struct QuantizedGroups {
  uint8_t* values = nullptr;
  float* scales = nullptr;
  int64_t value_count = 0, scale_count = 0;

  QuantizedGroups(DeviceMemory& memory, const Fp8RowGroups& groups, int cols)
      : value_count(groups.padded_rows() * cols),
        scale_count(groups.padded_rows() * (cols / kFp8BlockSize)) {
    values = memory.Allocate<uint8_t>(value_count);
    scales = memory.Allocate<float>(scale_count);
    EXPECT_EQ(cudaMemset(values, 0x55, value_count), cudaSuccess);
    EXPECT_EQ(cudaMemset(scales, 0x55, scale_count * sizeof(float)), cudaSuccess);
  }
  void ExpectEqual(const QuantizedGroups& other) const {
    EXPECT_EQ(Download<uint8_t>(values, value_count),
              Download<uint8_t>(other.values, other.value_count));
    EXPECT_EQ(Download<float>(scales, scale_count),
              Download<float>(other.scales, other.scale_count));
  }
};

TEST(Fp8Kernels, GroupedQuantizationGathersRowsByIndex) {
  REQUIRE_GPU();
  const int cols = 384, tokens = 23;
  const std::vector<int64_t> offsets = {0, 3, 3, 9, 40, 41};
  auto groups = MakeFp8RowGroups(offsets);
  ASSERT_TRUE(groups.ok()) << groups.status();
  const int rows = static_cast<int>(offsets.back());
  const auto x = RandomBf16(static_cast<size_t>(tokens) * cols, 5, 3.0f);
  std::mt19937 rng(11);
  std::vector<int32_t> source_rows(rows);
  std::vector<uint16_t> permuted(static_cast<size_t>(rows) * cols);
  for (int i = 0; i < rows; ++i) {
    source_rows[i] = static_cast<int32_t>(rng() % (tokens - 3));  // the last 3 rows go unread
    std::copy_n(x.begin() + static_cast<int64_t>(source_rows[i]) * cols, cols,
                permuted.begin() + static_cast<int64_t>(i) * cols);
  }
  DeviceMemory memory;
  const QuantizedGroups gathered(memory, *groups, cols), permuted_first(memory, *groups, cols);
  ASSERT_TRUE(QuantizeActivationGroupsFp8(AsBf16(memory.Upload(x)), *groups, cols,
                                          AsFp8(gathered.values), gathered.scales, nullptr,
                                          memory.Upload(source_rows))
                  .ok());
  ASSERT_TRUE(QuantizeActivationGroupsFp8(AsBf16(memory.Upload(permuted)), *groups, cols,
                                          AsFp8(permuted_first.values), permuted_first.scales,
                                          nullptr)
                  .ok());
  gathered.ExpectEqual(permuted_first);
}

// An FP8 dispatch: the sender quantizes its rows in send order into packed rows (codes, then
// scales), and the receiver moves the ones it received into its groups' layout. The result is
// bit for bit what quantizing the bf16 rows on the receiver gives, padding rows included.
TEST(Fp8Kernels, PackedRowsFromTheSenderGiveTheReceiversQuantization) {
  REQUIRE_GPU();
  const int cols = 384, tokens = 23, sent = 17;
  const int64_t row_bytes = Fp8PackedRowBytes(cols);
  EXPECT_EQ(row_bytes, 400);  // 384 codes and 3 scales, padded to 16 bytes
  EXPECT_EQ(Fp8PackedRowBytes(7168), 7392);
  const auto x = RandomBf16(static_cast<size_t>(tokens) * cols, 6, 3.0f);
  std::mt19937 rng(13);
  std::vector<int32_t> send_rows(sent);
  for (int i = 0; i < sent; ++i) send_rows[i] = static_cast<int32_t>(rng() % tokens);
  DeviceMemory memory;
  const __nv_bfloat16* device_x = AsBf16(memory.Upload(x));
  uint8_t* packed = memory.Allocate<uint8_t>(sent * row_bytes);
  ASSERT_TRUE(
      QuantizeRowsToPackedFp8(device_x, memory.Upload(send_rows), sent, cols, packed, nullptr)
          .ok());
  // Each packed row against the CPU twin's quantization of its token's row.
  const auto packed_host = Download<uint8_t>(packed, sent * row_bytes);
  for (int i = 0; i < sent; ++i) {
    std::vector<uint8_t> values(Fp8PaddedRows(1) * cols);
    std::vector<float> scales(ActivationScaleCount(1, cols));
    QuantizeActivationsFp8Twin(x.data() + static_cast<int64_t>(send_rows[i]) * cols, 1, cols,
                               values.data(), scales.data());
    const uint8_t* row = packed_host.data() + i * row_bytes;
    ASSERT_TRUE(std::equal(values.begin(), values.begin() + cols, row)) << "row " << i;
    for (int b = 0; b < cols / kFp8BlockSize; ++b) {
      float scale;
      std::memcpy(&scale, row + cols + 4 * b, sizeof(scale));
      EXPECT_EQ(scale, scales[b * Fp8PaddedRows(1)]) << "row " << i << ", tile " << b;
    }
  }

  // The receiver's groups read packed rows by index; quantizing the same tokens' bf16 rows on
  // the receiver is the reference.
  const std::vector<int64_t> offsets = {0, 3, 3, 9, 40, 41};
  auto groups = MakeFp8RowGroups(offsets);
  ASSERT_TRUE(groups.ok()) << groups.status();
  const int rows = static_cast<int>(offsets.back());
  std::vector<int32_t> received_rows(rows), token_rows(rows);
  for (int i = 0; i < rows; ++i) {
    received_rows[i] = static_cast<int32_t>(rng() % sent);
    token_rows[i] = send_rows[received_rows[i]];
  }
  const QuantizedGroups unpacked(memory, *groups, cols), quantized(memory, *groups, cols);
  ASSERT_TRUE(QuantizeInputGroupsFp8({.packed = packed, .rows = memory.Upload(received_rows)},
                                     *groups, cols, AsFp8(unpacked.values), unpacked.scales,
                                     nullptr)
                  .ok());
  ASSERT_TRUE(QuantizeInputGroupsFp8({.bf16 = device_x, .rows = memory.Upload(token_rows)}, *groups,
                                     cols, AsFp8(quantized.values), quantized.scales, nullptr)
                  .ok());
  unpacked.ExpectEqual(quantized);

  // Bad input: columns that are not whole tiles, and an input of neither or both forms.
  EXPECT_EQ(QuantizeRowsToPackedFp8(device_x, nullptr, 1, 100, packed, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(
      QuantizeInputGroupsFp8({}, *groups, cols, AsFp8(quantized.values), quantized.scales, nullptr)
          .code(),
      absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(QuantizeInputGroupsFp8({.bf16 = device_x, .packed = packed}, *groups, cols,
                                   AsFp8(quantized.values), quantized.scales, nullptr)
                .code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(Fp8Kernels, WeightBlockQuantizationMatchesTwin) {
  REQUIRE_GPU();
  const int out = 320, in = 384;  // a partial row block; 3 column blocks, scale stride 4
  const auto w = RandomBf16(static_cast<size_t>(out) * in, 5, 0.02f);
  std::vector<uint8_t> values(w.size());
  std::vector<float> scales(WeightScaleCount(out, in));
  QuantizeWeightBlocksFp8Twin(w.data(), out, in, values.data(), scales.data());
  DeviceMemory memory;
  uint8_t* device_values = memory.Allocate<uint8_t>(values.size());
  float* device_scales = memory.Allocate<float>(scales.size());
  ASSERT_TRUE(QuantizeWeightBlocksFp8(AsBf16(memory.Upload(w)), out, in, AsFp8(device_values),
                                      device_scales, nullptr)
                  .ok());
  EXPECT_EQ(Download<uint8_t>(device_values, values.size()), values);
  EXPECT_EQ(Download<float>(device_scales, scales.size()), scales);
}

TEST(Fp8Kernels, BlockScaledGemmMatchesTwin) {
  REQUIRE_GPU();
  auto gemm = Fp8BlockGemm::Create(nullptr);
  ASSERT_TRUE(gemm.ok()) << gemm.status();
  struct Shape {
    int rows, n, k;
  };
  // DeepSeek-V3's hidden size as k, decode-like and prefill-like rows (1 and 3 are padded to 4,
  // 130 to 132), and a k of 2 blocks whose weight scales carry padding.
  for (const Shape shape : {Shape{1, 512, 7168}, Shape{3, 512, 7168}, Shape{128, 512, 7168},
                            Shape{130, 384, 7168}, Shape{37, 256, 256}}) {
    SCOPED_TRACE(::testing::Message() << shape.rows << " x " << shape.n << " x " << shape.k);
    DeviceMemory memory;
    const TestWeight w = MakeWeight(shape.n, shape.k, 11, 0.02f, memory);
    const auto x = RandomBf16(static_cast<size_t>(shape.rows) * shape.k, 13, 1.0f);
    const int64_t padded = Fp8PaddedRows(shape.rows);
    std::vector<uint8_t> x_values(padded * shape.k);
    std::vector<float> x_scales(ActivationScaleCount(shape.rows, shape.k));
    QuantizeActivationsFp8Twin(x.data(), shape.rows, shape.k, x_values.data(), x_scales.data());
    std::vector<uint16_t> expected(static_cast<size_t>(shape.rows) * shape.n);
    Fp8GemmTwin(x_values.data(), x_scales.data(), shape.rows, w.twin(), shape.n, shape.k,
                expected.data());

    uint8_t* device_values = memory.Allocate<uint8_t>(x_values.size());
    float* device_scales = memory.Allocate<float>(x_scales.size());
    ASSERT_TRUE(QuantizeActivationsFp8(AsBf16(memory.Upload(x)), shape.rows, shape.k,
                                       AsFp8(device_values), device_scales, nullptr)
                    .ok());
    uint16_t* y = memory.Allocate<uint16_t>(padded * shape.n);
    const absl::Status status = gemm->Run(AsFp8(device_values), device_scales, shape.rows, w.device,
                                          shape.n, shape.k, AsBf16(y));
    ASSERT_TRUE(status.ok()) << status;
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const auto result = Download<uint16_t>(y, padded * shape.n);
    const Errors errors =
        Compare(Bf16Floats(result, expected.size()), Bf16Floats(expected, expected.size()));
    std::printf("FP8 GEMM %d x %d x %d vs twin: max/max %.2e, rms %.2e\n", shape.rows, shape.n,
                shape.k, errors.max_over_max, errors.rms_relative);
    EXPECT_LT(errors.max_over_max, 1e-2);
    for (size_t i = expected.size(); i < result.size(); ++i) {
      ASSERT_EQ(Bf16ToFloat(result[i]), 0.0f) << "padding row value " << i;
    }
  }
}

// The grouped GEMM (wgmma) against the twin group by group, on the same e4m3 operands, in both
// tile shapes: decode-like groups of 1, 0, 5, 64 (one whole narrow block of rows), 130 (three
// narrow blocks, the last partial) and 3 rows, and EP-decode-like groups of 300 (three wide
// tiles, the last partial), 0, 1 and 256 (two whole wide tiles) rows; k of 8 slices (more than
// either ring's stages) and 3 (fewer). Then what serving relies on: a row's bits do not depend
// on the rows beside it, the slot form (offsets and weights on the device, blocks for the busy
// slots only) gives the list form's bits, and the two tile shapes give the same bits.
TEST(Fp8Kernels, GroupedGemmMatchesTwinAndKeepsRowsIndependent) {
  REQUIRE_GPU();
  int device = 0;
  ASSERT_EQ(cudaGetDevice(&device), cudaSuccess);
  if (!Fp8GroupedGemmSupported(device)) GTEST_SKIP() << "compute capability 9.0 only";
  ASSERT_TRUE(PrepareFp8GroupedGemm().ok());
  const int n = 256;
  for (const std::vector<int64_t>& offsets : {std::vector<int64_t>{0, 1, 1, 6, 70, 200, 203},
                                              std::vector<int64_t>{0, 300, 300, 301, 557}}) {
    const int groups = static_cast<int>(offsets.size()) - 1,
              rows = static_cast<int>(offsets.back());
    for (const int k : {1024, 384}) {
      SCOPED_TRACE(::testing::Message() << rows << " rows in " << groups << " groups, k " << k);
      DeviceMemory memory;
      std::vector<TestWeight> weights;
      Fp8GemmGroupList list;
      list.count = groups;
      for (int g = 0; g < groups; ++g) {
        weights.push_back(MakeWeight(n, k, 300 + g, 0.02f, memory));
        list.weights[g] = weights[g].device;
        list.offsets[g + 1] = static_cast<int>(offsets[g + 1]);
      }
      const auto x = RandomBf16(static_cast<size_t>(rows) * k, 19, 1.0f);
      // Expected: each group's rows quantized and multiplied on their own (quantization is per
      // row, so the codes equal the all-rows quantization's).
      std::vector<uint16_t> expected(static_cast<size_t>(rows) * n);
      for (int g = 0; g < groups; ++g) {
        const int group_rows = static_cast<int>(offsets[g + 1] - offsets[g]);
        if (group_rows == 0) continue;
        std::vector<uint8_t> values(Fp8PaddedRows(group_rows) * k);
        std::vector<float> scales(ActivationScaleCount(group_rows, k));
        QuantizeActivationsFp8Twin(x.data() + offsets[g] * k, group_rows, k, values.data(),
                                   scales.data());
        std::vector<uint16_t> y(static_cast<size_t>(Fp8PaddedRows(group_rows)) * n);
        Fp8GemmTwin(values.data(), scales.data(), group_rows, weights[g].twin(), n, k, y.data());
        std::copy_n(y.begin(), static_cast<size_t>(group_rows) * n,
                    expected.begin() + offsets[g] * n);
      }
      auto all_rows = MakeFp8RowGroups({0, rows});
      ASSERT_TRUE(all_rows.ok());
      const int scale_rows = static_cast<int>(all_rows->padded_rows());
      uint8_t* values = memory.Allocate<uint8_t>(static_cast<size_t>(scale_rows) * k);
      float* scales = memory.Allocate<float>(static_cast<size_t>(scale_rows) * (k / 128));
      ASSERT_TRUE(QuantizeActivationGroupsFp8(AsBf16(memory.Upload(x)), *all_rows, k, AsFp8(values),
                                              scales, nullptr)
                      .ok());
      uint16_t* y = memory.Allocate<uint16_t>(expected.size());
      std::vector<uint16_t> narrow_result;
      for (const Fp8GemmTiles tiles : {Fp8GemmTiles::kNarrow, Fp8GemmTiles::kWide}) {
        const char* name = tiles == Fp8GemmTiles::kWide ? "wide" : "narrow";
        SCOPED_TRACE(name);
        ASSERT_EQ(cudaMemset(y, 0xff, expected.size() * 2), cudaSuccess);  // NaNs unless written
        const absl::Status status = Fp8GroupedGemm(AsFp8(values), scales, scale_rows, list, n, k,
                                                   AsBf16(y), nullptr, tiles);
        ASSERT_TRUE(status.ok()) << status;
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        const auto result = Download<uint16_t>(y, expected.size());
        const Errors errors =
            Compare(Bf16Floats(result, expected.size()), Bf16Floats(expected, expected.size()));
        std::printf(
            "grouped FP8 GEMM, %s tiles, %d rows in %d groups, n %d, k %d vs twin: max/max %.2e, "
            "rms %.2e\n",
            name, rows, groups, n, k, errors.max_over_max, errors.rms_relative);
        EXPECT_LT(errors.max_over_max, 1e-2);
        if (tiles == Fp8GemmTiles::kNarrow) {
          narrow_result = result;
        } else {
          EXPECT_EQ(result, narrow_result) << "wide tiles' bits differ from narrow tiles'";
        }

        // Row 40 (inside a group of at least 64 rows) alone in a group of one gives the same
        // bits.
        const int row = 40, group = offsets[1] > row ? 0 : 3;
        ASSERT_TRUE(offsets[group] <= row && row < offsets[group + 1]);
        Fp8GemmGroupList alone;
        alone.count = 1;
        alone.offsets[1] = 1;
        alone.weights[0] = weights[group].device;
        uint16_t* y_alone = memory.Allocate<uint16_t>(n);
        // Its codes are row 40 of the all-rows quantization; its scales, column b of one row.
        std::vector<float> all_scales =
            Download<float>(scales, static_cast<size_t>(scale_rows) * (k / 128));
        std::vector<float> row_scales(4 * (k / 128), 0.0f);  // one row padded to 4, ld 4
        for (int b = 0; b < k / 128; ++b) row_scales[b * 4] = all_scales[b * scale_rows + row];
        const absl::Status alone_status =
            Fp8GroupedGemm(AsFp8(values) + static_cast<int64_t>(row) * k, memory.Upload(row_scales),
                           4, alone, n, k, AsBf16(y_alone), nullptr, tiles);
        ASSERT_TRUE(alone_status.ok()) << alone_status;
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        EXPECT_EQ(Download<uint16_t>(y_alone, n),
                  std::vector<uint16_t>(result.begin() + static_cast<int64_t>(row) * n,
                                        result.begin() + static_cast<int64_t>(row + 1) * n));

        // The slot form: every slot, then blocks for the busy slots only; wide tiles with the
        // rows' total as their bound.
        std::vector<int32_t> slot_offsets(offsets.begin(), offsets.end());
        std::vector<Fp8Weight> slot_weights(list.weights, list.weights + groups);
        int busy = 0;
        for (int g = 0; g < groups; ++g) busy += offsets[g + 1] > offsets[g];
        Fp8GemmSlotGroups slots{memory.Upload(slot_offsets), memory.Upload(slot_weights), groups,
                                -1, rows};
        for (const int bound : {-1, busy}) {
          slots.busy_slot_bound = bound;
          ASSERT_EQ(cudaMemset(y, 0xff, expected.size() * 2), cudaSuccess);
          const absl::Status slot_status = Fp8GroupedGemm(AsFp8(values), scales, scale_rows, slots,
                                                          n, k, AsBf16(y), nullptr, tiles);
          ASSERT_TRUE(slot_status.ok()) << slot_status;
          ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
          EXPECT_EQ(Download<uint16_t>(y, expected.size()), result) << "busy slot bound " << bound;
        }
      }
    }
  }
  EXPECT_EQ(Fp8GroupedGemm(nullptr, nullptr, 4, Fp8GemmSlotGroups{nullptr, nullptr, 4, 4, -1}, 128,
                           128, nullptr, nullptr, Fp8GemmTiles::kWide)
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(
      Fp8GroupedGemm(nullptr, nullptr, 4, Fp8GemmGroupList{}, 100, 128, nullptr, nullptr).code(),
      absl::StatusCode::kInvalidArgument);
}

// Fp8Linear's two paths against their twins: the weight-only kernel (bf16 activations) up to its
// row limit, the recipe (quantized activations, cuBLASLt) above it; rows that are and are not
// whole groups of 4, and y += the product. The GEMM's tolerance (above) applies to both; the sum
// adds one bf16 rounding of y's magnitude.
TEST(Fp8Kernels, LinearTakesTheWeightOnlyKernelForFewRowsAndTheRecipeForMore) {
  REQUIRE_GPU();
  constexpr int kN = 384, kK = 1024, kMaxRows = 70;
  auto linear = Fp8Linear::Create(kMaxRows, 2048, 512, nullptr, /*weight_only_max_rows=*/8);
  ASSERT_TRUE(linear.ok()) << linear.status();
  EXPECT_FALSE(linear->Run(nullptr, kMaxRows + 1, {}, kN, kK, nullptr).ok());
  EXPECT_FALSE(linear->Run(nullptr, 1, {}, 640, kK, nullptr).ok());
  EXPECT_FALSE(linear->Run(nullptr, 1, {}, kN, 100, nullptr).ok());
  DeviceMemory memory;
  const TestWeight w = MakeWeight(kN, kK, 21, 0.02f, memory);
  for (const int rows : {1, 3, 8, 13, 64, 70}) {
    for (const bool accumulate : {false, true}) {
      SCOPED_TRACE(::testing::Message() << rows << " rows, accumulate " << accumulate);
      const auto x = RandomBf16(static_cast<size_t>(rows) * kK, 23 + rows, 1.0f);
      const auto y0 = RandomBf16(static_cast<size_t>(rows) * kN, 29 + rows, 0.5f);
      std::vector<uint16_t> product(static_cast<size_t>(rows) * kN);
      if (rows <= linear->weight_only_max_rows()) {
        Fp8WeightOnlyGemmTwin(x.data(), rows, w.twin(), kN, kK, product.data());
      } else {
        std::vector<uint8_t> x_values(Fp8PaddedRows(rows) * kK);
        std::vector<float> x_scales(ActivationScaleCount(rows, kK));
        QuantizeActivationsFp8Twin(x.data(), rows, kK, x_values.data(), x_scales.data());
        Fp8GemmTwin(x_values.data(), x_scales.data(), rows, w.twin(), kN, kK, product.data());
      }
      std::vector<float> expected = Bf16Floats(product, product.size());
      if (accumulate) {
        for (size_t i = 0; i < expected.size(); ++i) expected[i] += Bf16ToFloat(y0[i]);
      }
      // y has exactly `rows` rows, with a guard row after them that must stay untouched.
      std::vector<uint16_t> y_host = y0;
      y_host.resize(y0.size() + kN, 0x3f80);  // 1.0
      uint16_t* y = memory.Upload(y_host);
      const absl::Status status =
          linear->Run(AsBf16(memory.Upload(x)), rows, w.device, kN, kK, AsBf16(y), accumulate);
      ASSERT_TRUE(status.ok()) << status;
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      const auto result = Download<uint16_t>(y, y_host.size());
      const Errors errors = Compare(Bf16Floats(result, expected.size()), expected);
      EXPECT_LT(errors.max_over_max, 1e-2);
      for (size_t i = expected.size(); i < result.size(); ++i) {
        ASSERT_EQ(result[i], 0x3f80) << "guard row value " << i - expected.size();
      }
    }
  }
}

// The MLP without activation quantization, on the same dequantized weights: bf16 activations,
// fp32 accumulation (what the bf16 path computes if its weights were the FP8 ones).
std::vector<float> UnquantizedMlp(const std::vector<uint16_t>& x,
                                  const std::vector<int64_t>& offsets,
                                  const std::vector<TestWeight>& gate_up,
                                  const std::vector<TestWeight>& down, int hidden, int inter) {
  std::vector<float> y(static_cast<size_t>(offsets.back()) * hidden);
  for (size_t e = 0; e + 1 < offsets.size(); ++e) {
    const auto wgu = DequantizeWeightFp8Twin(gate_up[e].values.data(), gate_up[e].scales.data(),
                                             2 * inter, hidden);
    const auto wd =
        DequantizeWeightFp8Twin(down[e].values.data(), down[e].scales.data(), hidden, inter);
    for (int64_t r = offsets[e]; r < offsets[e + 1]; ++r) {
      std::vector<float> h(2 * inter), act(inter);
      for (int j = 0; j < 2 * inter; ++j) {
        float sum = 0;
        for (int i = 0; i < hidden; ++i) {
          sum += Bf16ToFloat(x[r * hidden + i]) * wgu[static_cast<size_t>(j) * hidden + i];
        }
        h[j] = Bf16ToFloat(FloatToBf16(sum));
      }
      for (int i = 0; i < inter; ++i) {
        act[i] = Bf16ToFloat(FloatToBf16(h[i] / (1.0f + std::exp(-h[i])) * h[inter + i]));
      }
      for (int j = 0; j < hidden; ++j) {
        float sum = 0;
        for (int i = 0; i < inter; ++i) sum += act[i] * wd[static_cast<size_t>(j) * inter + i];
        y[r * hidden + j] = Bf16ToFloat(FloatToBf16(sum));
      }
    }
  }
  return y;
}

void CheckExpertMlp(int hidden, int inter, const std::vector<int64_t>& offsets) {
  const int experts = static_cast<int>(offsets.size()) - 1;
  const int rows = static_cast<int>(offsets.back());
  DeviceMemory memory;
  std::vector<TestWeight> gate_up, down;
  std::vector<Fp8WeightTwin> gate_up_twin, down_twin;
  std::vector<Fp8Weight> gate_up_device, down_device;
  for (int e = 0; e < experts; ++e) {
    gate_up.push_back(MakeWeight(2 * inter, hidden, 100 + e, 0.03f, memory));
    down.push_back(MakeWeight(hidden, inter, 200 + e, 0.04f, memory));
  }
  for (int e = 0; e < experts; ++e) {
    gate_up_twin.push_back(gate_up[e].twin());
    down_twin.push_back(down[e].twin());
    gate_up_device.push_back(gate_up[e].device);
    down_device.push_back(down[e].device);
  }
  const auto x = RandomBf16(static_cast<size_t>(rows) * hidden, 17, 1.0f);
  std::vector<uint16_t> expected(x.size()), expected_weight_only(x.size());
  Fp8ExpertMlpTwin(x.data(), offsets, gate_up_twin, down_twin, hidden, inter, expected.data());
  Fp8WeightOnlyExpertMlpTwin(x.data(), offsets, gate_up_twin, down_twin, hidden, inter,
                             expected_weight_only.data());
  const auto unquantized = UnquantizedMlp(x, offsets, gate_up, down, hidden, inter);

  const uint16_t* device_x = memory.Upload(x);
  uint16_t* device_y = memory.Allocate<uint16_t>(x.size());
  auto mlp = Fp8ExpertMlp::Create(hidden, inter, rows, experts, nullptr);
  ASSERT_TRUE(mlp.ok()) << mlp.status();
  std::vector<Fp8ExpertMlp::Strategy> strategies = {
      Fp8ExpertMlp::Strategy::kPerExpertGemm, Fp8ExpertMlp::Strategy::kConcurrentGemm,
      Fp8ExpertMlp::Strategy::kPipelinedGemm, Fp8ExpertMlp::Strategy::kWeightOnly};
  std::vector<Fp8ExpertMlp::Strategy> gathering = {Fp8ExpertMlp::Strategy::kPerExpertGemm,
                                                   Fp8ExpertMlp::Strategy::kConcurrentGemm,
                                                   Fp8ExpertMlp::Strategy::kPipelinedGemm};
  if (mlp->grouped_gemm_supported()) {
    strategies.push_back(Fp8ExpertMlp::Strategy::kGroupedGemm);
    gathering.push_back(Fp8ExpertMlp::Strategy::kGroupedGemm);
  } else {
    std::printf("no grouped FP8 GEMM on this GPU (compute capability 9.0 only)\n");
    EXPECT_EQ(mlp->Run(AsBf16(device_x), offsets, gate_up_device, down_device, AsBf16(device_y),
                       Fp8ExpertMlp::Strategy::kGroupedGemm)
                  .code(),
              absl::StatusCode::kFailedPrecondition);
  }
  for (auto strategy : strategies) {
    // The decode strategy leaves the activations in bf16: its twin is the weight-only one, and
    // it is closer to the unquantized products than the recipe.
    const bool weight_only = strategy == Fp8ExpertMlp::Strategy::kWeightOnly;
    const auto expected_floats =
        Bf16Floats(weight_only ? expected_weight_only : expected, expected.size());
    ASSERT_EQ(cudaMemset(device_y, 0xff, x.size() * 2), cudaSuccess);  // NaNs unless written
    const absl::Status status = mlp->Run(AsBf16(device_x), offsets, gate_up_device, down_device,
                                         AsBf16(device_y), strategy);
    ASSERT_TRUE(status.ok()) << status;
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const auto result = Bf16Floats(Download<uint16_t>(device_y, x.size()), x.size());
    const Errors twin = Compare(result, expected_floats);
    const Errors recipe = Compare(result, unquantized);
    const Errors twin_recipe = Compare(expected_floats, unquantized);
    std::printf(
        "FP8 expert MLP H=%d I=%d rows=%d strategy %d: vs twin max/max %.2e rms %.2e; vs "
        "unquantized activations max/max %.2e rms %.2e (twin: %.2e, %.2e)\n",
        hidden, inter, rows, static_cast<int>(strategy), twin.max_over_max, twin.rms_relative,
        recipe.max_over_max, recipe.rms_relative, twin_recipe.max_over_max,
        twin_recipe.rms_relative);
    EXPECT_LT(twin.max_over_max, 3e-2);
    EXPECT_LT(twin.rms_relative, 1e-2);
    EXPECT_LT(recipe.rms_relative, weight_only ? 1e-2 : 8e-2);
  }

  // The pipelined strategy runs the same kernels as the concurrent one, an expert's on the same
  // side stream's GEMM, only in another order: the same bits.
  uint16_t* device_pipelined_y = memory.Allocate<uint16_t>(x.size());
  ASSERT_TRUE(mlp->Run(AsBf16(device_x), offsets, gate_up_device, down_device, AsBf16(device_y),
                       Fp8ExpertMlp::Strategy::kConcurrentGemm)
                  .ok());
  ASSERT_TRUE(mlp->Run(AsBf16(device_x), offsets, gate_up_device, down_device,
                       AsBf16(device_pipelined_y), Fp8ExpertMlp::Strategy::kPipelinedGemm)
                  .ok());
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_EQ(Download<uint16_t>(device_pipelined_y, x.size()),
            Download<uint16_t>(device_y, x.size()));

  // The same rows read in place through x_rows (the permute fused into the quantization): the
  // GEMM strategies give the same bits; the weight-only one refuses.
  std::vector<int32_t> x_rows(rows);
  for (int i = 0; i < rows; ++i) x_rows[i] = rows - 1 - i;
  std::vector<uint16_t> reversed(x.size());
  for (int i = 0; i < rows; ++i) {
    std::copy_n(x.begin() + static_cast<int64_t>(i) * hidden, hidden,
                reversed.begin() + static_cast<int64_t>(x_rows[i]) * hidden);
  }
  const int32_t* device_x_rows = memory.Upload(x_rows);
  const uint16_t* device_reversed = memory.Upload(reversed);
  uint16_t* device_gathered_y = memory.Allocate<uint16_t>(x.size());
  for (auto strategy : gathering) {
    ASSERT_TRUE(
        mlp->Run(AsBf16(device_x), offsets, gate_up_device, down_device, AsBf16(device_y), strategy)
            .ok());
    ASSERT_TRUE(mlp->Run(AsBf16(device_reversed), offsets, gate_up_device, down_device,
                         AsBf16(device_gathered_y), strategy, device_x_rows)
                    .ok());
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(Download<uint16_t>(device_gathered_y, x.size()),
              Download<uint16_t>(device_y, x.size()))
        << "strategy " << static_cast<int>(strategy);
  }
  EXPECT_EQ(mlp->Run(AsBf16(device_reversed), offsets, gate_up_device, down_device,
                     AsBf16(device_gathered_y), Fp8ExpertMlp::Strategy::kWeightOnly, device_x_rows)
                .code(),
            absl::StatusCode::kInvalidArgument);

  // The same rows quantized by a dispatch's sender (packed, in the reversed order) and read
  // through x_rows: the GEMM strategies give the bf16 rows' bits; the weight-only one refuses.
  uint8_t* packed = memory.Allocate<uint8_t>(rows * Fp8PackedRowBytes(hidden));
  ASSERT_TRUE(
      QuantizeRowsToPackedFp8(AsBf16(device_reversed), nullptr, rows, hidden, packed, nullptr)
          .ok());
  const Fp8InputRows packed_rows{.packed = packed, .rows = device_x_rows};
  for (auto strategy : gathering) {
    ASSERT_TRUE(
        mlp->Run(AsBf16(device_x), offsets, gate_up_device, down_device, AsBf16(device_y), strategy)
            .ok());
    ASSERT_EQ(cudaMemset(device_gathered_y, 0xff, x.size() * 2), cudaSuccess);
    ASSERT_TRUE(mlp->Run(packed_rows, offsets, gate_up_device, down_device,
                         AsBf16(device_gathered_y), strategy)
                    .ok());
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(Download<uint16_t>(device_gathered_y, x.size()),
              Download<uint16_t>(device_y, x.size()))
        << "packed rows, strategy " << static_cast<int>(strategy);
  }
  EXPECT_EQ(mlp->Run(Fp8InputRows{.packed = packed}, offsets, gate_up_device, down_device,
                     AsBf16(device_gathered_y), Fp8ExpertMlp::Strategy::kWeightOnly)
                .code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(Fp8Kernels, ExpertMlpMatchesTwinWithEveryStrategy) {
  REQUIRE_GPU();
  // One row, an empty expert, 5 and 7 rows (padded), 130 rows (more than a tile), 4 rows.
  CheckExpertMlp(1024, 256, {0, 1, 1, 6, 136, 143, 147});
}

TEST(Fp8Kernels, ExpertMlpAtDeepSeekV3SizesMatchesTwin) {
  REQUIRE_GPU();
  CheckExpertMlp(7168, 2048, {0, 1, 4, 12});  // decode-like: 1, 3 and 8 rows
}

}  // namespace
}  // namespace moeserve::kernels
