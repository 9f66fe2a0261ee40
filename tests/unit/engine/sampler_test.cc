// Sampler: greedy, temperature, top-k, top-p and seeding. Distributions are checked
// empirically against softmax probabilities computed here.
#include "engine/sampling/sampler.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <random>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/cpu_twins.h"

namespace moeserve::engine {
namespace {

SamplingOptions Options(float temperature, float top_p = 1.0f, int top_k = 0,
                        std::optional<uint64_t> seed = 1) {
  SamplingOptions options;
  options.temperature = temperature;
  options.top_p = top_p;
  options.top_k = top_k;
  options.seed = seed;
  return options;
}

// Frequencies of each token over `draws` samples.
std::vector<double> Frequencies(Sampler& sampler, const std::vector<float>& logits, int draws) {
  std::vector<double> counts(logits.size(), 0.0);
  for (int i = 0; i < draws; ++i) {
    const int32_t token = sampler.Sample(logits);
    EXPECT_GE(token, 0);
    EXPECT_LT(token, static_cast<int32_t>(logits.size()));
    counts[token] += 1;
  }
  for (double& c : counts) c /= draws;
  return counts;
}

// softmax(logits / temperature) restricted to `kept` token ids, renormalized.
std::vector<double> Expected(const std::vector<float>& logits, double temperature,
                             const std::vector<int>& kept) {
  std::vector<double> p(logits.size(), 0.0);
  double total = 0;
  for (int id : kept) total += (p[id] = std::exp(logits[id] / temperature));
  for (double& v : p) v /= total;
  return p;
}

void ExpectClose(const std::vector<double>& actual, const std::vector<double>& expected,
                 double tolerance) {
  ASSERT_EQ(actual.size(), expected.size());
  for (size_t i = 0; i < actual.size(); ++i) {
    EXPECT_NEAR(actual[i], expected[i], tolerance) << "token " << i;
  }
}

// softmax at T = 1: p = {0.2242, 0.6095, 0.1360, 0.0303}.
const std::vector<float> kLogits = {1.0f, 2.0f, 0.5f, -1.0f};
constexpr int kDraws = 20000;
// The standard error of a frequency is at most sqrt(0.25 / 20000) = 0.0035; allow ~4 sigma.
constexpr double kTolerance = 0.015;

TEST(ArgMax, LowestIndexWinsTies) {
  EXPECT_EQ(ArgMax(std::vector<float>{1.0f, 3.0f, 3.0f, 2.0f}), 1);
  EXPECT_EQ(ArgMax(std::vector<float>{-5.0f, -5.0f}), 0);
  EXPECT_EQ(ArgMax(std::vector<float>{-1.0f, -0.5f, -2.0f}), 1);
}

TEST(Sampler, TemperatureZeroIsArgMax) {
  Sampler sampler(Options(0.0f, 1.0f, 0, std::nullopt));
  for (int i = 0; i < 50; ++i) EXPECT_EQ(sampler.Sample(kLogits), 1);
  EXPECT_EQ(sampler.Sample(std::vector<float>{0.0f, 7.0f, 7.0f, 7.0f}), 1);
}

TEST(Sampler, TopKOneIsArgMaxAtAnyTemperature) {
  for (float temperature : {0.1f, 1.0f, 10.0f, 1000.0f}) {
    Sampler sampler(Options(temperature, 1.0f, 1, 99));
    for (int i = 0; i < 200; ++i) {
      ASSERT_EQ(sampler.Sample(kLogits), 1) << "temperature " << temperature;
      ASSERT_EQ(sampler.Sample(std::vector<float>{0.0f, 7.0f, 7.0f}), 1)
          << "tie, temperature " << temperature;
    }
  }
}

TEST(Sampler, TinyTopPIsArgMax) {
  Sampler sampler(Options(5.0f, 1e-6f, 0, 3));
  for (int i = 0; i < 500; ++i) ASSERT_EQ(sampler.Sample(kLogits), 1);
}

TEST(Sampler, SameSeedSameSequence) {
  const std::vector<float> flat(32, 0.0f);
  Sampler a(Options(1.0f, 1.0f, 0, 1234)), b(Options(1.0f, 1.0f, 0, 1234));
  std::vector<int32_t> first, second;
  for (int i = 0; i < 200; ++i) {
    first.push_back(a.Sample(flat));
    second.push_back(b.Sample(flat));
  }
  EXPECT_EQ(first, second);
  // With top-k and top-p too.
  Sampler c(Options(0.7f, 0.9f, 3, 5)), d(Options(0.7f, 0.9f, 3, 5));
  for (int i = 0; i < 200; ++i) ASSERT_EQ(c.Sample(kLogits), d.Sample(kLogits));
}

TEST(Sampler, DifferentSeedsDiffer) {
  const std::vector<float> flat(32, 0.0f);
  Sampler a(Options(1.0f, 1.0f, 0, 1)), b(Options(1.0f, 1.0f, 0, 2));
  std::vector<int32_t> first, second;
  for (int i = 0; i < 64; ++i) {
    first.push_back(a.Sample(flat));
    second.push_back(b.Sample(flat));
  }
  EXPECT_NE(first, second);
}

TEST(Sampler, UnseededSamplersDiffer) {
  const std::vector<float> flat(32, 0.0f);
  Sampler a(Options(1.0f, 1.0f, 0, std::nullopt)), b(Options(1.0f, 1.0f, 0, std::nullopt));
  std::vector<int32_t> first, second;
  for (int i = 0; i < 64; ++i) {
    first.push_back(a.Sample(flat));
    second.push_back(b.Sample(flat));
  }
  EXPECT_NE(first, second);
}

TEST(Sampler, TemperatureOneFollowsSoftmax) {
  Sampler sampler(Options(1.0f, 1.0f, 0, 20250227));
  ExpectClose(Frequencies(sampler, kLogits, kDraws), Expected(kLogits, 1.0, {0, 1, 2, 3}),
              kTolerance);
}

TEST(Sampler, TemperatureSharpensAndFlattens) {
  Sampler cold(Options(0.5f, 1.0f, 0, 11));
  ExpectClose(Frequencies(cold, kLogits, kDraws), Expected(kLogits, 0.5, {0, 1, 2, 3}), kTolerance);
  Sampler hot(Options(3.0f, 1.0f, 0, 12));
  ExpectClose(Frequencies(hot, kLogits, kDraws), Expected(kLogits, 3.0, {0, 1, 2, 3}), kTolerance);
}

TEST(Sampler, TopKRenormalizesOverTheKBest) {
  // Top-2 keeps tokens 1 and 0: p = {e^1, e^2} / (e^1 + e^2) = {0.2689, 0.7311}.
  Sampler sampler(Options(1.0f, 1.0f, 2, 21));
  ExpectClose(Frequencies(sampler, kLogits, kDraws), Expected(kLogits, 1.0, {0, 1}), kTolerance);
}

TEST(Sampler, TopPKeepsTheSmallestPrefixReachingP) {
  // Sorted probabilities 0.6095, 0.2242, 0.1360, 0.0303: top_p = 0.7 needs the first two.
  Sampler two(Options(1.0f, 0.7f, 0, 31));
  ExpectClose(Frequencies(two, kLogits, kDraws), Expected(kLogits, 1.0, {0, 1}), kTolerance);
  // top_p = 0.9 needs three (0.6095 + 0.2242 = 0.8337 < 0.9).
  Sampler three(Options(1.0f, 0.9f, 0, 32));
  ExpectClose(Frequencies(three, kLogits, kDraws), Expected(kLogits, 1.0, {0, 1, 2}), kTolerance);
  // top_p = 0.5 is reached by the best token alone.
  Sampler one(Options(1.0f, 0.5f, 0, 33));
  ExpectClose(Frequencies(one, kLogits, 1000), Expected(kLogits, 1.0, {1}), 0.0);
}

TEST(Sampler, TopPZeroMeansOff) {
  // The API treats top_p 0 (unset) as 1.0.
  Sampler sampler(Options(1.0f, 0.0f, 0, 41));
  ExpectClose(Frequencies(sampler, kLogits, kDraws), Expected(kLogits, 1.0, {0, 1, 2, 3}),
              kTolerance);
}

TEST(Sampler, TopKAndTopPCombine) {
  // top_k 3 keeps {1, 0, 2} (renormalized: 0.6282, 0.2311, 0.1402); top_p 0.8 then keeps 1, 0.
  Sampler sampler(Options(1.0f, 0.8f, 3, 51));
  ExpectClose(Frequencies(sampler, kLogits, kDraws), Expected(kLogits, 1.0, {0, 1}), kTolerance);
}

TEST(Sampler, NeverPicksAnImpossibleToken) {
  const std::vector<float> logits = {0.0f, -INFINITY, 0.0f, -INFINITY};
  Sampler sampler(Options(1.0f, 1.0f, 0, 61));
  const std::vector<double> f = Frequencies(sampler, logits, 4000);
  EXPECT_EQ(f[1], 0.0);
  EXPECT_EQ(f[3], 0.0);
  EXPECT_NEAR(f[0], 0.5, 0.04);
}

// The sampling rule written the plain way, for the test only: sort the whole vocabulary (logit
// descending, ties to the lower id), cut to top-k, then to the top-p prefix, draw from the
// same 53-bit uniform.
int32_t ReferenceSample(const std::vector<float>& logits, const SamplingOptions& o,
                        std::mt19937_64& rng) {
  std::vector<int32_t> order(logits.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int32_t>(i);
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
  size_t keep = o.top_k > 0 ? std::min<size_t>(order.size(), o.top_k) : order.size();
  std::vector<double> p(keep);
  double total = 0;
  for (size_t i = 0; i < keep; ++i) {
    p[i] = std::exp((static_cast<double>(logits[order[i]]) - logits[order[0]]) / o.temperature);
    total += p[i];
  }
  if (o.top_p > 0 && o.top_p < 1) {
    double mass = 0;
    for (size_t i = 0; i < keep; ++i) {
      mass += p[i] / total;
      if (mass >= o.top_p) {
        keep = i + 1;
        break;
      }
    }
    total = 0;
    for (size_t i = 0; i < keep; ++i) total += p[i];
  }
  const double u = static_cast<double>(rng() >> 11) * (1.0 / 9007199254740992.0) * total;
  double cumulative = 0;
  for (size_t i = 0; i < keep; ++i) {
    cumulative += p[i];
    if (u < cumulative) return order[i];
  }
  return order[keep - 1];
}

// DeepSeek-V3's vocabulary size, with options whose draws reach past any sorted head: a hot
// temperature over everything, a top-k of 1000, a top-p prefix of thousands of tokens.
TEST(Sampler, LargeVocabulariesFollowTheFullSortRule) {
  std::mt19937 data(3);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  std::vector<float> logits(129280);
  for (float& v : logits) v = normal(data);
  logits[77] = logits[78];  // a tie: the lower id comes first
  for (const SamplingOptions& o : {Options(0.7f), Options(5.0f), Options(1.0f, 1.0f, 1000),
                                   Options(3.0f, 0.99f), Options(1.0f, 0.9f, 300)}) {
    Sampler sampler(o);
    std::mt19937_64 reference_rng(*o.seed);
    for (int draw = 0; draw < 40; ++draw) {
      ASSERT_EQ(sampler.Sample(logits), ReferenceSample(logits, o, reference_rng))
          << "temperature " << o.temperature << " top_p " << o.top_p << " top_k " << o.top_k
          << " draw " << draw;
    }
  }
}

// A GPU backend hands the sampler each row's head (ranked by the kernel whose twin is used
// here) and falls back to the whole row, with the same draw, where the walk goes past it. That
// must pick exactly the tokens Sample() picks from the whole row.
TEST(Sampler, PickingFromTheHeadGivesTheWholeRowsTokens) {
  std::mt19937 data(5);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  for (const int vocab : {129280, 300}) {
    std::vector<float> logits(vocab);
    for (float& v : logits) v = std::round(normal(data) * 64.0f) / 64.0f;  // with many ties
    int from_head = 0;
    int from_row = 0;
    for (const SamplingOptions& o :
         {Options(0.0f), Options(0.7f), Options(5.0f), Options(1.0f, 1.0f, 50),
          Options(1.0f, 1.0f, 2000), Options(3.0f, 0.99f), Options(1.0f, 0.9f, 300),
          Options(0.3f, 0.5f)}) {
      Sampler whole(o);
      Sampler headed(o);
      const kernels::LogitHeadParams params = headed.HeadParams(vocab);
      ASSERT_LE(params.head_size, kernels::kMaxLogitHead);
      std::vector<int32_t> ids(params.head_size);
      std::vector<float> values(params.head_size);
      double kept_weight = 0.0;
      kernels::LogitHeadsTwin(logits.data(), 1, vocab, &params, ids.data(), values.data(),
                              &kept_weight);
      for (int draw = 0; draw < 30; ++draw) {
        bool asked_for_row = false;
        const absl::StatusOr<int32_t> token = headed.SampleFromHead(
            ids, values, kept_weight, vocab, [&]() -> absl::StatusOr<std::span<const float>> {
              asked_for_row = true;
              return std::span<const float>(logits);
            });
        ASSERT_TRUE(token.ok()) << token.status();
        ++(asked_for_row ? from_row : from_head);
        ASSERT_EQ(*token, whole.Sample(logits))
            << "vocab " << vocab << " temperature " << o.temperature << " top_p " << o.top_p
            << " top_k " << o.top_k << " draw " << draw;
      }
    }
    // Both paths ran: most draws stop inside the head, the hot flat ones go past it.
    EXPECT_GT(from_head, 0) << vocab;
    if (vocab > kernels::kMaxLogitHead) {
      EXPECT_GT(from_row, 0) << vocab;
    }
  }
}

}  // namespace
}  // namespace moeserve::engine
