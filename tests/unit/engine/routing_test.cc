// MoE routing (RouteTokens) on hand-made cases: sigmoid + noaux_tc (DeepSeek-V3), softmax +
// group_limited_greedy (DeepSeek-V2) and plain greedy; plus CombineExpertOutputs.
//
// Expected choices and weights are worked out by hand in the comments. Logits are built from
// the scores we want: sigmoid^-1(s) = ln(s / (1 - s)).
#include <cmath>
#include <vector>

#include "engine/model/model_config.h"
#include "engine/model/moe.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moeserve::engine {
namespace {

using ::testing::ElementsAre;
using ::testing::FloatNear;

// 8 experts in 4 groups of 2, 2 groups eligible, 2 experts per token.
ModelConfig V3Config() {
  ModelConfig c;
  c.model_type = "deepseek_v3";
  c.n_routed_experts = 8;
  c.num_experts_per_tok = 2;
  c.n_group = 4;
  c.topk_group = 2;
  c.scoring_func = ScoringFunction::kSigmoid;
  c.topk_method = TopKMethod::kNoAuxTc;
  c.norm_topk_prob = true;
  c.routed_scaling_factor = 2.5;
  return c;
}

ModelConfig V2Config() {
  ModelConfig c = V3Config();
  c.model_type = "deepseek_v2";
  c.scoring_func = ScoringFunction::kSoftmax;
  c.topk_method = TopKMethod::kGroupLimitedGreedy;
  c.norm_topk_prob = false;
  c.routed_scaling_factor = 2.0;
  return c;
}

std::vector<float> LogitsForSigmoidScores(const std::vector<double>& scores) {
  std::vector<float> logits;
  for (double s : scores) logits.push_back(static_cast<float>(std::log(s / (1.0 - s))));
  return logits;
}

// Sigmoid scores per group:  g0 = {0.95, 0.05}: sum 1.00, max 0.95
//                            g1 = {0.60, 0.55}: sum 1.15, max 0.60
//                            g2 = {0.58, 0.50}: sum 1.08, max 0.58
//                            g3 = {0.10, 0.10}: sum 0.20
const std::vector<double> kScores = {0.95, 0.05, 0.60, 0.55, 0.58, 0.50, 0.10, 0.10};

TEST(RouteTokensNoAuxTc, GroupScoreIsSumOfTopTwoAndOnlyChosenGroupsAreEligible) {
  // Groups by top-2 sum: g1 (1.15), g2 (1.08) win over g0 (1.00), although g0 holds the best
  // expert (0.95). Top-2 experts among g1 ∪ g2: e2 (0.60), e4 (0.58).
  // Weights: normalized, then * 2.5: 0.60 / 1.18 * 2.5, 0.58 / 1.18 * 2.5.
  const ModelConfig c = V3Config();
  const std::vector<float> logits = LogitsForSigmoidScores(kScores);
  const Routing r = RouteTokens(c, logits.data(), 1, nullptr);
  EXPECT_EQ(r.num_tokens, 1);
  EXPECT_EQ(r.top_k, 2);
  EXPECT_THAT(r.experts, ElementsAre(2, 4));
  EXPECT_THAT(r.weights,
              ElementsAre(FloatNear(0.60 / 1.18 * 2.5, 1e-5), FloatNear(0.58 / 1.18 * 2.5, 1e-5)));
}

TEST(RouteTokensNoAuxTc, BiasChangesTheChoiceButWeightsComeFromUnbiasedScores) {
  // Bias +0.10 on e3: biased e3 = 0.65 > e2 = 0.60, so e3 comes first; g1's biased sum 1.25
  // and g2's 1.08 keep the same groups. Weights use the unbiased 0.55 and 0.60:
  // 0.55 / 1.15 * 2.5 and 0.60 / 1.15 * 2.5 — the first-ranked expert gets the smaller weight.
  const ModelConfig c = V3Config();
  const std::vector<float> logits = LogitsForSigmoidScores(kScores);
  const std::vector<float> bias = {0, 0, 0, 0.10f, 0, 0, 0, 0};
  const Routing r = RouteTokens(c, logits.data(), 1, bias.data());
  EXPECT_THAT(r.experts, ElementsAre(3, 2));
  EXPECT_THAT(r.weights,
              ElementsAre(FloatNear(0.55 / 1.15 * 2.5, 1e-5), FloatNear(0.60 / 1.15 * 2.5, 1e-5)));
}

TEST(RouteTokensNoAuxTc, BiasCanMoveAWholeGroupIn) {
  // Bias +0.60 on e6 and +0.45 on e7: g3's biased scores {0.70, 0.55} sum to 1.25 and beat g2
  // (1.08); eligible g3 ∪ g1 with biased scores e6 0.70, e2 0.60, e3 0.55, e7 0.55 -> e6, e2.
  // Weights from unbiased scores 0.10 and 0.60: 0.10 / 0.70 * 2.5, 0.60 / 0.70 * 2.5.
  const ModelConfig c = V3Config();
  const std::vector<float> logits = LogitsForSigmoidScores(kScores);
  const std::vector<float> bias = {0, 0, 0, 0, 0, 0, 0.60f, 0.45f};
  const Routing r = RouteTokens(c, logits.data(), 1, bias.data());
  EXPECT_THAT(r.experts, ElementsAre(6, 2));
  EXPECT_THAT(r.weights,
              ElementsAre(FloatNear(0.10 / 0.70 * 2.5, 1e-5), FloatNear(0.60 / 0.70 * 2.5, 1e-5)));
}

TEST(RouteTokensNoAuxTc, ExcludedGroupsStayExcludedWhenBiasedScoresAreNegative) {
  // A uniform bias of -1 makes every biased score negative but changes no ranking: still e2,
  // e4. (Masking excluded experts to 0 instead of -inf would wrongly pick them.)
  const ModelConfig c = V3Config();
  const std::vector<float> logits = LogitsForSigmoidScores(kScores);
  const std::vector<float> bias(8, -1.0f);
  const Routing r = RouteTokens(c, logits.data(), 1, bias.data());
  EXPECT_THAT(r.experts, ElementsAre(2, 4));
  EXPECT_THAT(r.weights,
              ElementsAre(FloatNear(0.60 / 1.18 * 2.5, 1e-5), FloatNear(0.58 / 1.18 * 2.5, 1e-5)));
}

TEST(RouteTokensNoAuxTc, WithoutNormalizationWeightsAreScaledScores) {
  // norm_topk_prob = false: weight = sigmoid score * routed_scaling_factor.
  ModelConfig c = V3Config();
  c.norm_topk_prob = false;
  const std::vector<float> logits = LogitsForSigmoidScores(kScores);
  const Routing r = RouteTokens(c, logits.data(), 1, nullptr);
  EXPECT_THAT(r.experts, ElementsAre(2, 4));
  EXPECT_THAT(r.weights, ElementsAre(FloatNear(0.60 * 2.5, 1e-5), FloatNear(0.58 * 2.5, 1e-5)));
}

TEST(RouteTokensNoAuxTc, EachTokenIsRoutedOnItsOwnRow) {
  // Token 0: the case above. Token 1: the scores reversed,
  // {0.10, 0.10, 0.50, 0.58, 0.55, 0.60, 0.05, 0.95}: group sums g0 0.20, g1 1.08, g2 1.15,
  // g3 1.00 -> g2, g1 eligible -> e5 (0.60), e3 (0.58).
  const ModelConfig c = V3Config();
  std::vector<double> reversed(kScores.rbegin(), kScores.rend());
  std::vector<float> logits = LogitsForSigmoidScores(kScores);
  const std::vector<float> second = LogitsForSigmoidScores(reversed);
  logits.insert(logits.end(), second.begin(), second.end());
  const Routing r = RouteTokens(c, logits.data(), 2, nullptr);
  EXPECT_EQ(r.num_tokens, 2);
  EXPECT_THAT(r.experts, ElementsAre(2, 4, 5, 3));
}

TEST(RouteTokensNoAuxTc, TopKIsOrderedBestFirst) {
  // One group holding everything (n_group 1): plain top-4 of the biased scores, best first.
  ModelConfig c = V3Config();
  c.n_group = 1;
  c.topk_group = 1;
  c.num_experts_per_tok = 4;
  const std::vector<float> logits =
      LogitsForSigmoidScores({0.2, 0.9, 0.4, 0.7, 0.3, 0.8, 0.1, 0.6});
  const Routing r = RouteTokens(c, logits.data(), 1, nullptr);
  EXPECT_THAT(r.experts, ElementsAre(1, 5, 3, 7));
  // Normalized over 0.9 + 0.8 + 0.7 + 0.6 = 3.0, times 2.5.
  EXPECT_THAT(r.weights,
              ElementsAre(FloatNear(0.9 / 3.0 * 2.5, 1e-5), FloatNear(0.8 / 3.0 * 2.5, 1e-5),
                          FloatNear(0.7 / 3.0 * 2.5, 1e-5), FloatNear(0.6 / 3.0 * 2.5, 1e-5)));
}

// Softmax of `logits` in double precision.
std::vector<double> Softmax(const std::vector<float>& logits) {
  double total = 0;
  std::vector<double> p;
  for (float l : logits) total += std::exp(static_cast<double>(l));
  for (float l : logits) p.push_back(std::exp(static_cast<double>(l)) / total);
  return p;
}

// Logits per group: g0 = {3.0, -3.0} (max 3.0, the best group by max but not by a top-2 sum),
// g1 = {2.0, 1.9}, g2 = {1.8, 1.7}, g3 = {0, 0}.
const std::vector<float> kV2Logits = {3.0f, -3.0f, 2.0f, 1.9f, 1.8f, 1.7f, 0.0f, 0.0f};

TEST(RouteTokensGroupLimitedGreedy, GroupScoreIsMaxAndScalingAppliesWithoutNormalization) {
  // Group scores (max of softmax probs) rank g0, g1 -> eligible e0, e1, e2, e3 -> top-2 e0, e2.
  // norm_topk_prob = false: weight = softmax prob * routed_scaling_factor (2.0).
  const ModelConfig c = V2Config();
  const std::vector<double> p = Softmax(kV2Logits);
  const Routing r = RouteTokens(c, kV2Logits.data(), 1, nullptr);
  EXPECT_THAT(r.experts, ElementsAre(0, 2));
  EXPECT_THAT(r.weights, ElementsAre(FloatNear(p[0] * 2.0, 1e-6), FloatNear(p[2] * 2.0, 1e-6)));
}

TEST(RouteTokensGroupLimitedGreedy, OnlyChosenGroupsAreEligible) {
  // topk_group = 1 -> only g0 -> experts e0 then e1, although e2 (2.0) beats e1 (-3.0).
  ModelConfig c = V2Config();
  c.topk_group = 1;
  const std::vector<double> p = Softmax(kV2Logits);
  const Routing r = RouteTokens(c, kV2Logits.data(), 1, nullptr);
  EXPECT_THAT(r.experts, ElementsAre(0, 1));
  EXPECT_THAT(r.weights, ElementsAre(FloatNear(p[0] * 2.0, 1e-6), FloatNear(p[1] * 2.0, 1e-6)));
}

TEST(RouteTokensGroupLimitedGreedy, NormalizedWeightsAreNotScaledForV2) {
  // DeepSeek-V2 applies routed_scaling_factor only when it does not normalize:
  // weights = p / (p0 + p2), summing to 1 — not 2.
  ModelConfig c = V2Config();
  c.norm_topk_prob = true;
  const std::vector<double> p = Softmax(kV2Logits);
  const Routing r = RouteTokens(c, kV2Logits.data(), 1, nullptr);
  EXPECT_THAT(r.experts, ElementsAre(0, 2));
  EXPECT_THAT(r.weights, ElementsAre(FloatNear(p[0] / (p[0] + p[2]), 1e-6),
                                     FloatNear(p[2] / (p[0] + p[2]), 1e-6)));
}

TEST(RouteTokensGreedy, PlainTopKOverAllExpertsBestFirst) {
  // Greedy ignores groups: top-3 softmax probs e0 (3.0), e2 (2.0), e3 (1.9).
  ModelConfig c = V2Config();
  c.topk_method = TopKMethod::kGreedy;
  c.num_experts_per_tok = 3;
  c.topk_group = 1;
  const std::vector<double> p = Softmax(kV2Logits);
  const Routing r = RouteTokens(c, kV2Logits.data(), 1, nullptr);
  EXPECT_THAT(r.experts, ElementsAre(0, 2, 3));
  EXPECT_THAT(r.weights, ElementsAre(FloatNear(p[0] * 2.0, 1e-6), FloatNear(p[2] * 2.0, 1e-6),
                                     FloatNear(p[3] * 2.0, 1e-6)));
}

TEST(RouteTokensGreedy, SigmoidGreedyNormalizesThenScalesForV3) {
  ModelConfig c = V3Config();
  c.topk_method = TopKMethod::kGreedy;
  const std::vector<float> logits = LogitsForSigmoidScores(kScores);
  const Routing r = RouteTokens(c, logits.data(), 1, nullptr);
  EXPECT_THAT(r.experts, ElementsAre(0, 2));
  EXPECT_THAT(r.weights,
              ElementsAre(FloatNear(0.95 / 1.55 * 2.5, 1e-5), FloatNear(0.60 / 1.55 * 2.5, 1e-5)));
}

TEST(CombineExpertOutputs, WeightedSumPlusShared) {
  // 2 tokens, top-2, hidden 3.
  Routing routing{2, 2, {4, 1, 0, 3}, {0.5f, 2.0f, -1.0f, 0.25f}};
  const std::vector<float> expert_outputs = {
      1,  2,  3,   // token 0, choice 0
      10, 20, 30,  // token 0, choice 1
      4,  5,  6,   // token 1, choice 0
      8,  8,  8,   // token 1, choice 1
  };
  const std::vector<float> shared = {100, 200, 300, 1, 1, 1};
  std::vector<float> out(6, -7.0f);
  CombineExpertOutputs(routing, expert_outputs.data(), shared.data(), 3, out.data());
  EXPECT_THAT(out, ElementsAre(120.5f, 241.0f, 361.5f, -1.0f, -2.0f, -3.0f));
  CombineExpertOutputs(routing, expert_outputs.data(), nullptr, 3, out.data());
  EXPECT_THAT(out, ElementsAre(20.5f, 41.0f, 61.5f, -2.0f, -3.0f, -4.0f));
}

}  // namespace
}  // namespace moeserve::engine
