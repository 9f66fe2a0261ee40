// FewRowsLinear (kernels/few_rows_linear.h), the decode steps' dense projections, against its CPU
// twins: bf16 and FP8 weights, bf16 and fp32 outputs, with and without adding to y, in one
// share of k and in several; a row's bits whatever the rows beside it; and the shapes it
// refuses. Skipped where no GPU is present.
//
// Tolerance: the kernel and the twins both accumulate in fp32, in different orders (the kernel
// in shares of k), and round to bf16: max |diff| / max |ref| < 1e-2, as for DeviceGroupedGemm.
#include <cuda_runtime_api.h>

#include <cstring>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/bf16.h"
#include "kernels/cpu_twins.h"
#include "kernels/few_rows_linear.h"
#include "kernels/fp8.h"
#include "kernels/fp8_twins.h"
#include "tests/gpu/device_copies.h"

namespace moeserve::kernels {
namespace {

using testing::DeviceMemory;
using testing::RandomBf16;
using testing::RelativeError;
using testing::ToHost;

__nv_bfloat16* Bf(uint16_t* p) { return reinterpret_cast<__nv_bfloat16*>(p); }

std::vector<uint16_t> ToBf16(const std::vector<float>& values) {
  std::vector<uint16_t> out(values.size());
  for (size_t i = 0; i < values.size(); ++i) out[i] = FloatToBf16(values[i]);
  return out;
}

// One weight on the host (bf16, and its FP8 blocks) and on the device, and the twins' products.
struct TestWeight {
  int n, k;
  std::vector<uint16_t> bf16;
  std::vector<uint8_t> values;
  std::vector<float> scales;
  FewRowsLinear::Weight on_device_bf16, on_device_fp8;

  TestWeight(DeviceMemory& memory, int n_, int k_, unsigned seed)
      : n(n_),
        k(k_),
        bf16(RandomBf16(static_cast<size_t>(n_) * k_, seed, 0.05f)),
        values(bf16.size()),
        scales(WeightScaleCount(n_, k_)) {
    QuantizeWeightBlocksFp8Twin(bf16.data(), n, k, values.data(), scales.data());
    on_device_bf16 = {.bf16 = Bf(memory.Upload(bf16)), .fp8 = {}};
    on_device_fp8 = {.bf16 = nullptr,
                     .fp8 = {reinterpret_cast<const __nv_fp8_e4m3*>(memory.Upload(values)),
                             memory.Upload(scales)}};
  }
  std::vector<uint16_t> Twin(const std::vector<uint16_t>& x, int rows, bool fp8) const {
    std::vector<uint16_t> y(static_cast<size_t>(rows) * n);
    if (fp8) {
      Fp8WeightOnlyGemmTwin(x.data(), rows, {values.data(), scales.data()}, n, k, y.data());
    } else {
      GroupedLinearTwin(x.data(), {bf16.data()}, {0, rows}, y.data(), n, k);
    }
    return y;
  }
};

struct Shape {
  int n, k;
};

TEST(FewRowsLinear, MatchesItsTwinsInEveryOutputForm) {
  REQUIRE_GPU();
  DeviceMemory memory;
  auto linear = FewRowsLinear::Create(40960, nullptr);
  ASSERT_TRUE(linear.ok()) << linear.status();
  // Few columns and a long k (split into shares; a partial column block: 264 = 2 x 128 + 8),
  // DeepSeek-V3's kv_a width (576), and more column blocks than a wave (one share).
  for (const Shape shape : {Shape{264, 2048}, Shape{576, 1024}, Shape{34816, 256}}) {
    SCOPED_TRACE(::testing::Message() << "n " << shape.n << ", k " << shape.k << ", "
                                      << linear->KShares(shape.n, shape.k) << " shares");
    const TestWeight w(memory, shape.n, shape.k, 11);
    for (const int rows : {1, 5, 16}) {
      const auto x = RandomBf16(static_cast<size_t>(rows) * shape.k, 3 + rows);
      const __nv_bfloat16* dx = Bf(memory.Upload(x));
      const size_t count = static_cast<size_t>(rows) * shape.n;
      const auto before = RandomBf16(count, 77, 0.5f);
      for (const bool fp8 : {false, true}) {
        SCOPED_TRACE(::testing::Message() << rows << " rows, " << (fp8 ? "FP8" : "bf16"));
        const FewRowsLinear::Weight& weight = fp8 ? w.on_device_fp8 : w.on_device_bf16;
        const std::vector<uint16_t> expected = w.Twin(x, rows, fp8);
        std::vector<float> expected_sum(count);
        for (size_t i = 0; i < count; ++i) {
          expected_sum[i] = Bf16ToFloat(before[i]) + Bf16ToFloat(expected[i]);
        }
        // bf16 y.
        uint16_t* y = memory.Allocate<uint16_t>(count);
        ASSERT_TRUE(linear->Run(dx, rows, weight, shape.n, shape.k, y, CUDA_R_16BF).ok());
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        EXPECT_LT(RelativeError(ToHost(y, count), expected), 1e-2);
        // bf16 y += the product.
        uint16_t* sum = memory.Upload(before);
        ASSERT_TRUE(linear->Run(dx, rows, weight, shape.n, shape.k, sum, CUDA_R_16BF, true).ok());
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        EXPECT_LT(RelativeError(ToHost(sum, count), ToBf16(expected_sum)), 1e-2);
        // fp32 y, set and added to.
        float* y32 = memory.Allocate<float>(count);
        ASSERT_TRUE(linear->Run(dx, rows, weight, shape.n, shape.k, y32, CUDA_R_32F).ok());
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        EXPECT_LT(RelativeError(ToBf16(ToHost(y32, count)), expected), 1e-2);
        std::vector<float> before32(count);
        for (size_t i = 0; i < count; ++i) before32[i] = Bf16ToFloat(before[i]);
        float* sum32 = memory.Upload(before32);
        ASSERT_TRUE(linear->Run(dx, rows, weight, shape.n, shape.k, sum32, CUDA_R_32F, true).ok());
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        EXPECT_LT(RelativeError(ToBf16(ToHost(sum32, count)), ToBf16(expected_sum)), 1e-2);
      }
    }
  }
  // The first shape runs in several shares on any GPU of more than a few multiprocessors, the
  // last in one.
  EXPECT_GT(linear->KShares(264, 2048), 1);
  EXPECT_EQ(linear->KShares(34816, 256), 1);
}

// A row's result is the same bits alone and among 16 rows, in bf16 and FP8, split or not: the
// decode step of any batch (and any EP layout, graph or none) gives a token the same bits.
TEST(FewRowsLinear, ARowsBitsDoNotDependOnTheRowsBesideIt) {
  REQUIRE_GPU();
  DeviceMemory memory;
  auto linear = FewRowsLinear::Create(4096, nullptr);
  ASSERT_TRUE(linear.ok()) << linear.status();
  for (const Shape shape : {Shape{264, 2048}, Shape{4096, 512}}) {
    const TestWeight w(memory, shape.n, shape.k, 5);
    const int rows = FewRowsLinear::kMaxRows;
    const auto x = RandomBf16(static_cast<size_t>(rows) * shape.k, 9);
    const uint16_t* dx = memory.Upload(x);
    for (const bool fp8 : {false, true}) {
      SCOPED_TRACE(::testing::Message() << "n " << shape.n << (fp8 ? " FP8" : " bf16"));
      const FewRowsLinear::Weight& weight = fp8 ? w.on_device_fp8 : w.on_device_bf16;
      auto run = [&](int first, int count) {
        float* y = memory.Allocate<float>(static_cast<size_t>(count) * shape.n);
        EXPECT_TRUE(linear
                        ->Run(Bf(const_cast<uint16_t*>(dx)) + static_cast<size_t>(first) * shape.k,
                              count, weight, shape.n, shape.k, y, CUDA_R_32F)
                        .ok());
        EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        return ToHost(y, static_cast<size_t>(count) * shape.n);
      };
      const auto together = run(0, rows);
      for (const int row : {0, 6, rows - 1}) {
        const auto alone = run(row, 1);
        EXPECT_EQ(0, std::memcmp(alone.data(), together.data() + static_cast<size_t>(row) * shape.n,
                                 shape.n * sizeof(float)))
            << "row " << row;
      }
    }
  }
}

TEST(FewRowsLinear, RefusesWhatItCannotRun) {
  REQUIRE_GPU();
  auto linear = FewRowsLinear::Create(1024, nullptr);
  ASSERT_TRUE(linear.ok()) << linear.status();
  const FewRowsLinear::Weight none{};
  const FewRowsLinear::Weight some{.bf16 = reinterpret_cast<const __nv_bfloat16*>(&none),
                                   .fp8 = {}};
  EXPECT_FALSE(
      linear->Run(nullptr, FewRowsLinear::kMaxRows + 1, some, 256, 256, nullptr, CUDA_R_16BF).ok());
  EXPECT_FALSE(linear->Run(nullptr, 4, some, 2048, 256, nullptr, CUDA_R_16BF).ok());  // > max_n
  EXPECT_FALSE(linear->Run(nullptr, 4, some, 250, 256, nullptr, CUDA_R_16BF).ok());
  EXPECT_FALSE(linear->Run(nullptr, 4, some, 256, 200, nullptr, CUDA_R_16BF).ok());
  EXPECT_FALSE(linear->Run(nullptr, 4, some, 256, 256, nullptr, CUDA_R_16F).ok());
  EXPECT_FALSE(linear->Run(nullptr, 4, none, 256, 256, nullptr, CUDA_R_16BF).ok());
  EXPECT_FALSE(FewRowsLinear::Create(0, nullptr).ok());
}

}  // namespace
}  // namespace moeserve::kernels
