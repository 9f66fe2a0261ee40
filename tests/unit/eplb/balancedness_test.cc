// Balancedness (mean/max GPU load per layer) of given placements, checked by hand, and the
// errors for placements that cannot be measured.

#include "eplb/balancedness.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <vector>

namespace moeserve::eplb {
namespace {

using ::testing::DoubleNear;
using ::testing::HasSubstr;

TEST(MeasureBalanceTest, SplitsAnExpertsLoadEvenlyOverItsReplicas) {
  // Expert 0 (load 8) has three replicas: slots 1, 3, 4. GPU 0 = slots 0..2 = 4 + 8/3 + 2,
  // GPU 1 = slots 3..5 = 8/3 + 8/3 + 2. Mean 8, max 26/3.
  const auto balance = MeasureBalance({{8, 4, 2, 2}}, {{1, 0, 3, 0, 0, 2}}, 2);
  ASSERT_TRUE(balance.ok()) << balance.status();
  ASSERT_EQ(balance->size(), 1u);
  EXPECT_THAT((*balance)[0].mean_gpu_load, DoubleNear(8.0, 1e-9));
  EXPECT_THAT((*balance)[0].max_gpu_load, DoubleNear(26.0 / 3.0, 1e-9));
  EXPECT_THAT((*balance)[0].balancedness(), DoubleNear(8.0 / (26.0 / 3.0), 1e-9));
}

TEST(MeasureBalanceTest, PerfectlyEvenPlacementScoresOne) {
  const auto balance = MeasureBalance({{3, 1, 2, 2}}, {{0, 1, 2, 3}}, 2);
  ASSERT_TRUE(balance.ok());
  EXPECT_DOUBLE_EQ((*balance)[0].balancedness(), 1.0);
}

TEST(MeasureBalanceTest, LayerWithoutLoadScoresOne) {
  const auto balance = MeasureBalance({{0, 0}}, {{0, 1}}, 2);
  ASSERT_TRUE(balance.ok());
  EXPECT_DOUBLE_EQ((*balance)[0].balancedness(), 1.0);
}

TEST(MeasureBalanceTest, RejectsPlacementsThatCannotServe) {
  const std::vector<std::vector<float>> weight = {{1, 2, 3, 4}};
  struct Case {
    std::vector<std::vector<int>> phy2log;
    int num_gpus;
    const char* fragment;
  };
  const std::vector<Case> cases = {
      {{}, 2, "phy2log has 0 layers"},
      {{{0, 1, 2, 3}, {0, 1, 2, 3}}, 2, "phy2log has 2 layers"},
      {{{0, 1, 2}}, 2, "not a positive multiple"},
      {{{0, 1, 2, 4}}, 2, "names expert 4"},
      {{{0, 1, 2, -1}}, 2, "names expert -1"},
      {{{0, 1, 2, 2}}, 2, "no slot for expert 3"},
      {{{0, 1, 2, 3}}, 0, "num_gpus"},
  };
  for (const Case& bad : cases) {
    const auto balance = MeasureBalance(weight, bad.phy2log, bad.num_gpus);
    ASSERT_FALSE(balance.ok()) << bad.fragment;
    EXPECT_EQ(balance.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(balance.status().message(), HasSubstr(bad.fragment));
  }
  EXPECT_FALSE(MeasureBalance({{1, 2}, {1}}, {{0, 1}, {0, 1}}, 1).ok()) << "ragged weight";
  EXPECT_FALSE(MeasureBalance({}, {}, 1).ok()) << "empty weight";
}

TEST(MeasureStaticBalanceTest, ExpertsInIdOrderOneReplicaEach) {
  // GPU 0 gets experts 0, 1 (8 + 4), GPU 1 gets 2, 3 (2 + 2): mean 8, max 12.
  const auto balance = MeasureStaticBalance({{8, 4, 2, 2}}, 2);
  ASSERT_TRUE(balance.ok());
  EXPECT_DOUBLE_EQ((*balance)[0].max_gpu_load, 12.0);
  EXPECT_DOUBLE_EQ((*balance)[0].balancedness(), 8.0 / 12.0);
}

TEST(MeasureStaticBalanceTest, ExpertsThatDoNotDivideEvenlyFillLowerGpusFirst) {
  // Expert e on GPU e*2/3: experts 0, 1 on GPU 0, expert 2 on GPU 1.
  const auto balance = MeasureStaticBalance({{1, 1, 1}}, 2);
  ASSERT_TRUE(balance.ok());
  EXPECT_DOUBLE_EQ((*balance)[0].max_gpu_load, 2.0);
  EXPECT_DOUBLE_EQ((*balance)[0].mean_gpu_load, 1.5);
}

TEST(MeasureStaticBalanceTest, RejectsBadInput) {
  EXPECT_FALSE(MeasureStaticBalance({}, 2).ok());
  EXPECT_FALSE(MeasureStaticBalance({{1, 2}, {3}}, 2).ok());
  EXPECT_FALSE(MeasureStaticBalance({{1, 2}}, 0).ok());
}

TEST(AverageBalancednessTest, MeansOverLayers) {
  const std::vector<LayerBalance> layers = {{.mean_gpu_load = 1, .max_gpu_load = 2},
                                            {.mean_gpu_load = 3, .max_gpu_load = 3}};
  EXPECT_DOUBLE_EQ(AverageBalancedness(layers), 0.75);
  EXPECT_DOUBLE_EQ(AverageBalancedness({}), 1.0);
}

}  // namespace
}  // namespace moeserve::eplb
