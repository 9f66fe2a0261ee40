// The CUDA kernels' CPU twins against the engine's fp32 CPU implementation: the twins are the
// reference the GPU kernels are tested against, so they must agree with the model code.
#include <algorithm>
#include <random>
#include <vector>

#include "engine/model/builtin_models.h"
#include "engine/model/model_config.h"
#include "engine/model/moe.h"
#include "engine/ops/cpu_ops.h"
#include "engine/parallel/ep_forward.h"
#include "engine/placement/expert_placement.h"
#include "gtest/gtest.h"
#include "kernels/cpu_twins.h"
#include "tests/unit/kernels/random_routing.h"

namespace moeserve::kernels {
namespace {

TEST(KernelTwins, Bf16RoundsToNearestEven) {
  EXPECT_EQ(FloatToBf16(1.0f), 0x3f80);
  EXPECT_EQ(Bf16ToFloat(0x3f80), 1.0f);
  // 1 + 2^-8 is exactly halfway between two bf16 values: rounds to the even one (1.0).
  EXPECT_EQ(FloatToBf16(1.0f + 1.0f / 256), 0x3f80);
  EXPECT_EQ(FloatToBf16(1.0f + 3.0f / 256), 0x3f82);
  EXPECT_EQ(Bf16ToFloat(FloatToBf16(-2.5f)), -2.5f);
}

TEST(KernelTwins, GateTopKTwinRoutesLikeTheEngine) {
  for (const std::string name : {"builtin:tiny-e256", "builtin:tiny-v2"}) {
    engine::ModelConfig config = *engine::BuiltinModelConfig(name);
    GateOptions options;
    options.num_experts = config.n_routed_experts;
    options.top_k = config.num_experts_per_tok;
    options.num_groups = config.n_group;
    options.topk_groups = config.topk_group;
    options.sigmoid = config.scoring_func == engine::ScoringFunction::kSigmoid;
    options.group_score_top2_sum = config.topk_method == engine::TopKMethod::kNoAuxTc;
    options.normalize = config.norm_topk_prob;
    options.scaling = static_cast<float>(config.routed_scaling_factor);
    const int tokens = 64;
    std::mt19937 rng(3);
    std::normal_distribution<float> normal(0, 1);
    std::vector<float> logits(static_cast<size_t>(tokens) * options.num_experts),
        bias(options.num_experts);
    for (auto& l : logits) l = normal(rng);
    for (auto& b : bias) b = 0.05f * normal(rng);
    const bool use_bias = options.sigmoid;
    std::vector<int32_t> experts(tokens * options.top_k);
    std::vector<float> weights(experts.size());
    GateTopKTwin(logits.data(), use_bias ? bias.data() : nullptr, tokens, options, experts.data(),
                 weights.data());
    const engine::Routing routing =
        engine::RouteTokens(config, logits.data(), tokens, use_bias ? bias.data() : nullptr);
    EXPECT_EQ(experts, routing.experts) << name;
    for (size_t i = 0; i < weights.size(); ++i)
      EXPECT_NEAR(weights[i], routing.weights[i], 1e-6) << name;
  }
}

TEST(KernelTwins, RmsNormTwinMatchesTheEngineWithinBf16) {
  const int rows = 5, dim = 256;
  std::mt19937 rng(4);
  std::normal_distribution<float> normal(0, 1);
  std::vector<uint16_t> x(rows * dim), w(dim), out(rows * dim);
  std::vector<float> xf(rows * dim), wf(dim), reference(rows * dim);
  for (int i = 0; i < rows * dim; ++i) xf[i] = Bf16ToFloat(x[i] = FloatToBf16(normal(rng)));
  for (int i = 0; i < dim; ++i) wf[i] = Bf16ToFloat(w[i] = FloatToBf16(1 + 0.1f * normal(rng)));
  RmsNormTwin(x.data(), w.data(), out.data(), rows, dim, 1e-6f);
  engine::cpu::RmsNorm(xf.data(), wf.data(), reference.data(), rows, dim, 1e-6f);
  for (int i = 0; i < rows * dim; ++i) {
    EXPECT_NEAR(Bf16ToFloat(out[i]), reference[i], 1e-2 * std::max(1.0f, std::fabs(reference[i])));
  }
}

TEST(KernelTwins, UnpermuteTwinCombinesLikeTheEngine) {
  const int tokens = 4, top_k = 3, hidden = 16;
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0, 1);
  engine::Routing routing{tokens, top_k, std::vector<int32_t>(tokens * top_k),
                          std::vector<float>(tokens * top_k)};
  for (auto& w : routing.weights) w = normal(rng);
  std::vector<uint16_t> rows(static_cast<size_t>(tokens) * top_k * hidden);
  std::vector<float> rows_float(rows.size());
  for (size_t i = 0; i < rows.size(); ++i)
    rows_float[i] = Bf16ToFloat(rows[i] = FloatToBf16(normal(rng)));
  std::vector<int32_t> identity(tokens * top_k);
  for (int i = 0; i < tokens * top_k; ++i) identity[i] = i;
  std::vector<uint16_t> out(static_cast<size_t>(tokens) * hidden);
  WeightedUnpermuteTwin(rows.data(), identity.data(), routing.weights.data(), nullptr, out.data(),
                        tokens, top_k, hidden);
  std::vector<float> reference(static_cast<size_t>(tokens) * hidden);
  engine::CombineExpertOutputs(routing, rows_float.data(), nullptr, hidden, reference.data());
  for (size_t i = 0; i < reference.size(); ++i) {
    EXPECT_NEAR(Bf16ToFloat(out[i]), reference[i], 1e-2 * std::max(1.0f, std::fabs(reference[i])));
  }
}

// The device plan's twin serves every (token, expert) pair from the slot the host's dispatch
// plan picks for a group of one rank, hot experts' replicas included, and groups the rows so
// that WeightedUnpermute finds each pair's row.
TEST(KernelTwins, PlanSlotsTwinPicksTheDispatchPlansSlots) {
  const int experts = 16, slots = 24, tokens = 37, top_k = 4, layer = 1;
  // Default placement: experts 0..7 have a second replica in slots 16..23.
  const engine::ExpertPlacement placement =
      engine::ExpertPlacement::Default(/*num_layers=*/2, experts, slots);
  const std::vector<int32_t> routed = testing::RandomRouting(tokens, top_k, experts, 11);
  std::vector<int32_t> begin(experts + 1, 0), replica_slots;
  for (int e = 0; e < experts; ++e) {
    for (int32_t slot : placement.replicas(layer, e)) replica_slots.push_back(slot);
    begin[e + 1] = static_cast<int32_t>(replica_slots.size());
  }
  std::vector<int32_t> offsets(slots + 1), source_rows(tokens * top_k), positions(tokens * top_k);
  std::vector<int32_t> load(slots, 1);  // adds to what is there
  PlanSlotsTwin(routed.data(), tokens, top_k, begin.data(), replica_slots.data(), slots,
                offsets.data(), source_rows.data(), positions.data(), load.data());

  const engine::parallel::DispatchPlan plan =
      engine::parallel::PlanDispatch(routed, top_k, layer, placement, /*rank=*/0, /*size=*/1);
  EXPECT_EQ(offsets[0], 0);
  EXPECT_EQ(offsets[slots], tokens * top_k);
  std::vector<int> rows_of_slot(slots, 0);
  for (int64_t entry = 0; entry < static_cast<int64_t>(plan.entries.size()); ++entry) {
    const int pair = plan.sent_assignment[entry];
    const int slot = plan.entries[entry].slot;  // the slot the host plan serves this pair from
    ++rows_of_slot[slot];
    EXPECT_GE(positions[pair], offsets[slot]) << "pair " << pair;
    EXPECT_LT(positions[pair], offsets[slot + 1]) << "pair " << pair;
    EXPECT_EQ(source_rows[positions[pair]], pair / top_k);
  }
  for (int s = 0; s < slots; ++s) {
    EXPECT_EQ(offsets[s + 1] - offsets[s], rows_of_slot[s]) << "slot " << s;
    EXPECT_EQ(load[s], 1 + rows_of_slot[s]) << "slot " << s;
  }
  // A hot expert's tokens alternate between its two replicas.
  EXPECT_GT(rows_of_slot[16], 0);
}

TEST(KernelTwins, FillRandomIsDeterministicWithTheRequestedSpread) {
  std::vector<uint16_t> a(50000), b(50000), c(50000);
  FillRandomBf16Twin(a.data(), 50000, 7, 0.25f);
  FillRandomBf16Twin(b.data(), 50000, 7, 0.25f);
  FillRandomBf16Twin(c.data(), 50000, 8, 0.25f);
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
  double sum = 0, squares = 0, max = 0;
  for (uint16_t v : a) {
    const double x = Bf16ToFloat(v);
    sum += x;
    squares += x * x;
    max = std::max(max, std::fabs(x));
  }
  EXPECT_NEAR(sum / 50000, 0.0, 0.005);
  EXPECT_NEAR(std::sqrt(squares / 50000), 0.25, 0.005);
  EXPECT_LE(max, 0.25 * std::sqrt(3.0) * 1.01);  // uniform: bounded by sqrt(3) std
}

}  // namespace
}  // namespace moeserve::kernels
