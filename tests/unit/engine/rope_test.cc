// RotaryEmbedding (plain RoPE and YaRN, DeepSeek's interleaved pair layout) and the YaRN
// attention-softmax scale of ModelConfig, against hand-computed values.
#include "engine/model/rope.h"

#include <cmath>
#include <numeric>
#include <vector>

#include "engine/model/builtin_models.h"
#include "engine/model/model_config.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moeserve::engine {
namespace {

using ::testing::DoubleNear;
using ::testing::ElementsAre;
using ::testing::FloatNear;
using ::testing::Pointwise;

std::vector<float> Ramp(int dim) {
  std::vector<float> v(dim);
  for (int i = 0; i < dim; ++i) v[i] = 0.25f * static_cast<float>(i + 1) * (i % 2 ? -1.0f : 1.0f);
  return v;
}

double Norm(const std::vector<float>& v) {
  double sum = 0;
  for (float x : v) sum += static_cast<double>(x) * x;
  return std::sqrt(sum);
}

// The YaRN case used below: d = 16, theta = 10000, factor = 40, original context 4096,
// beta_fast = 32, beta_slow = 1, mscale = 1, mscale_all_dim = 0.707.
RopeScaling SmallYarn() {
  RopeScaling yarn;
  yarn.type = RopeScaling::Type::kYarn;
  yarn.factor = 40.0;
  yarn.original_max_position_embeddings = 4096;
  yarn.beta_fast = 32.0;
  yarn.beta_slow = 1.0;
  yarn.mscale = 1.0;
  yarn.mscale_all_dim = 0.707;
  return yarn;
}

TEST(PlainRope, PositionZeroIsIdentity) {
  RotaryEmbedding rope(8, 16, 10000.0, RopeScaling{});
  std::vector<float> v = Ramp(8);
  const std::vector<float> original = v;
  rope.Apply(v.data(), 0);
  EXPECT_EQ(v, original);
}

TEST(PlainRope, InverseFrequenciesAreThetaPowers) {
  // inv_freq[i] = theta^(-2i/d) with d = 8, theta = 10000: 1, 0.1, 0.01, 0.001.
  RotaryEmbedding rope(8, 4, 10000.0, RopeScaling{});
  EXPECT_THAT(rope.inverse_frequencies(),
              Pointwise(DoubleNear(1e-15), std::vector<double>{1.0, 0.1, 0.01, 0.001}));
  EXPECT_EQ(rope.magnitude_scale(), 1.0);
}

TEST(PlainRope, RotatesInterleavedPairsByPositionTimesFrequency) {
  // d = 4, theta = 10000, position 3: pair (0,1) turns by 3 rad, pair (2,3) by 3 * 0.01 rad.
  // cos(3) = -0.9899924966004454, sin(3) = 0.1411200080598672,
  // cos(0.03) = 0.9995500337489875, sin(0.03) = 0.02999550020249566.
  RotaryEmbedding rope(4, 8, 10000.0, RopeScaling{});
  std::vector<float> v = {1.0f, 2.0f, -0.5f, 0.25f};
  rope.Apply(v.data(), 3);
  const double c0 = -0.9899924966004454, s0 = 0.1411200080598672;
  const double c1 = 0.9995500337489875, s1 = 0.02999550020249566;
  EXPECT_THAT(
      v,
      ElementsAre(FloatNear(1.0 * c0 - 2.0 * s0, 1e-6), FloatNear(2.0 * c0 + 1.0 * s0, 1e-6),
                  FloatNear(-0.5 * c1 - 0.25 * s1, 1e-6), FloatNear(0.25 * c1 + -0.5 * s1, 1e-6)));
}

TEST(PlainRope, EveryPairMatchesTheAngleFormulaAtManyPositions) {
  const int dim = 16;
  const double theta = 500.0;
  RotaryEmbedding rope(dim, 64, theta, RopeScaling{});
  for (int position : {1, 2, 7, 31, 63}) {
    std::vector<float> v = Ramp(dim);
    const std::vector<float> original = v;
    rope.Apply(v.data(), position);
    for (int i = 0; i < dim / 2; ++i) {
      const double angle = position * std::pow(theta, -2.0 * i / dim);
      const double x = original[2 * i], y = original[2 * i + 1];
      EXPECT_NEAR(v[2 * i], x * std::cos(angle) - y * std::sin(angle), 2e-5)
          << "position " << position << " pair " << i;
      EXPECT_NEAR(v[2 * i + 1], y * std::cos(angle) + x * std::sin(angle), 2e-5)
          << "position " << position << " pair " << i;
    }
  }
}

TEST(PlainRope, PreservesTheNorm) {
  RotaryEmbedding rope(16, 128, 10000.0, RopeScaling{});
  for (int position = 0; position < 128; position += 9) {
    std::vector<float> v = Ramp(16);
    const double before = Norm(v);
    rope.Apply(v.data(), position);
    EXPECT_NEAR(Norm(v), before, 1e-5 * before) << "position " << position;
  }
}

TEST(PlainRope, DotProductDependsOnlyOnRelativePosition) {
  RotaryEmbedding rope(8, 64, 10000.0, RopeScaling{});
  auto rotated_dot = [&](int query_position, int key_position) {
    std::vector<float> q = Ramp(8), k = {0.3f, -0.1f, 0.7f, 0.2f, -0.4f, 0.5f, 0.9f, -0.6f};
    rope.Apply(q.data(), query_position);
    rope.Apply(k.data(), key_position);
    return std::inner_product(q.begin(), q.end(), k.begin(), 0.0);
  };
  EXPECT_NEAR(rotated_dot(5, 2), rotated_dot(40, 37), 1e-5);
  EXPECT_NEAR(rotated_dot(9, 9), rotated_dot(0, 0), 1e-5);
}

TEST(Yarn, InverseFrequenciesMatchHandComputedValues) {
  // Computed with numpy:
  //   corr(r) = d * ln(orig / (r * 2π)) / (2 ln theta)        -> corr(32) = 2.618, corr(1) = 5.628
  //   low = max(floor(corr(beta_fast)), 0) = 2, high = min(ceil(corr(beta_slow)), d - 1) = 6
  //   extra = theta^(-2i/d), inter = extra / factor, ramp = clip((i - low) / (high - low), 0, 1)
  //   inv_freq = inter * ramp + extra * (1 - ramp)
  // So i = 0..2 keep theta^(-2i/d), i = 3..5 blend, i = 6, 7 are divided by 40.
  const std::vector<double> expected = {1.0,
                                        0.31622776601683794,
                                        0.09999999999999999,
                                        0.023914724805023366,
                                        0.005125,
                                        0.000849862121170252,
                                        2.5e-05,
                                        7.905694150420949e-06};
  const std::vector<double> actual = YarnInverseFrequencies(16, 10000.0, SmallYarn());
  ASSERT_EQ(actual.size(), expected.size());
  for (size_t i = 0; i < expected.size(); ++i) {
    EXPECT_NEAR(actual[i], expected[i], 1e-12 * expected[i]) << "i = " << i;
  }
  RotaryEmbedding rope(16, 8, 10000.0, SmallYarn());
  for (size_t i = 0; i < expected.size(); ++i) {
    EXPECT_NEAR(rope.inverse_frequencies()[i], expected[i], 1e-12 * expected[i]) << "i = " << i;
  }
}

TEST(Yarn, MscaleFormula) {
  // mscale(f, m) = 0.1 * m * ln(f) + 1, and 1 when f <= 1.
  EXPECT_NEAR(YarnMagnitude(40.0, 1.0), 1.3688879454113936, 1e-12);  // 0.1 * ln 40 + 1
  EXPECT_NEAR(YarnMagnitude(4.0, 0.8), 1.1109035488895913, 1e-12);   // 0.08 * ln 4 + 1
  EXPECT_EQ(YarnMagnitude(1.0, 5.0), 1.0);
  EXPECT_EQ(YarnMagnitude(0.5, 5.0), 1.0);
}

TEST(Yarn, MagnitudeScaleIsRatioOfMscales) {
  // mscale(40, 1) / mscale(40, 0.707) = 1.3688879454 / 1.2608037774 = 1.0857263992561355.
  RotaryEmbedding rope(16, 8, 10000.0, SmallYarn());
  EXPECT_NEAR(rope.magnitude_scale(), 1.0857263992561355, 1e-12);
  // Position 0 only scales by the magnitude; every pair's norm grows by that factor elsewhere.
  std::vector<float> v = Ramp(16);
  const std::vector<float> original = v;
  rope.Apply(v.data(), 0);
  for (int i = 0; i < 16; ++i) EXPECT_NEAR(v[i], original[i] * 1.0857263992561355, 1e-6);
  std::vector<float> w = Ramp(16);
  rope.Apply(w.data(), 5);
  EXPECT_NEAR(Norm(w), Norm(original) * 1.0857263992561355, 1e-5);
}

TEST(Yarn, RotatesByScaledFrequencies) {
  // Pair 7 (i = 7 > high) rotates at theta^(-14/16) / 40 = 7.905694150420949e-06 rad per position.
  // At position 7: angle_7 = 5.5339859e-05; pair 3 at 0.023914724805023366 * 7 = 0.16740307.
  RotaryEmbedding rope(16, 8, 10000.0, SmallYarn());
  std::vector<float> v = Ramp(16);
  const std::vector<float> original = v;
  rope.Apply(v.data(), 7);
  const double m = 1.0857263992561355;
  for (auto [pair, frequency] :
       {std::pair{3, 0.023914724805023366}, std::pair{7, 7.905694150420949e-06}}) {
    const double angle = 7 * frequency;
    const double x = original[2 * pair], y = original[2 * pair + 1];
    EXPECT_NEAR(v[2 * pair], m * (x * std::cos(angle) - y * std::sin(angle)), 1e-5);
    EXPECT_NEAR(v[2 * pair + 1], m * (y * std::cos(angle) + x * std::sin(angle)), 1e-5);
  }
}

TEST(Yarn, ZeroWidthRampDoesNotDivideByZero) {
  // With beta_fast == beta_slow at an integer correction dimension, low == high; the reference
  // widens the ramp by 0.001 so frequencies stay finite.
  RopeScaling yarn = SmallYarn();
  yarn.beta_slow = yarn.beta_fast;
  for (double f : YarnInverseFrequencies(16, 10000.0, yarn)) EXPECT_TRUE(std::isfinite(f));
}

TEST(AttentionSoftmaxScale, PlainRopeIsInverseSqrtOfQkHeadDim) {
  ModelConfig config;
  config.qk_nope_head_dim = 32;
  config.qk_rope_head_dim = 16;
  EXPECT_NEAR(config.attention_softmax_scale(), 1.0 / std::sqrt(48.0), 1e-15);
}

TEST(AttentionSoftmaxScale, YarnMultipliesBySquaredMscaleAllDim) {
  // 1/sqrt(48) * mscale(40, 0.707)^2 = 0.14433756729740643 * 1.2608037774^2 = 0.22944277358585224.
  ModelConfig config;
  config.qk_nope_head_dim = 32;
  config.qk_rope_head_dim = 16;
  config.rope_scaling = SmallYarn();
  EXPECT_NEAR(config.attention_softmax_scale(), 0.22944277358585224, 1e-12);
  // mscale_all_dim = 0 leaves the scale alone.
  config.rope_scaling.mscale_all_dim = 0.0;
  EXPECT_NEAR(config.attention_softmax_scale(), 1.0 / std::sqrt(48.0), 1e-15);
}

TEST(AttentionSoftmaxScale, BuiltinTiny) {
  // builtin:tiny: qk_head_dim 48, factor 4, mscale_all_dim 0.8:
  // 1/sqrt(48) * (0.08 ln 4 + 1)^2 = 0.17812795813243096; its rope magnitude is
  // mscale(4, 1) / mscale(4, 0.8) = 1.0249579607969668.
  absl::StatusOr<ModelConfig> config = BuiltinModelConfig("builtin:tiny");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_NEAR(config->attention_softmax_scale(), 0.17812795813243096, 1e-12);
  RotaryEmbedding rope(*config);
  EXPECT_NEAR(rope.magnitude_scale(), 1.0249579607969668, 1e-12);
}

}  // namespace
}  // namespace moeserve::engine
