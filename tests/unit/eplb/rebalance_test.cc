// RebalanceExperts: DeepSeek's published example, small cases checked by hand, every
// precondition, and structural properties on random inputs.

#include "eplb/rebalance.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cfloat>
#include <cmath>
#include <limits>
#include <random>
#include <set>
#include <vector>

#include "eplb/balancedness.h"

namespace moeserve::eplb {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using Matrix = std::vector<std::vector<float>>;

// Replica ranks of expert `expert` in `layer`, i.e. row log2phy[layer][expert][*].
std::vector<int> Log2PhyRow(const ExpertPlacementPlan& plan, int layer, int expert) {
  std::vector<int> row;
  for (int rank = 0; rank < plan.max_replica_count; ++rank) {
    row.push_back(plan.Log2Phy(layer, expert, rank));
  }
  return row;
}

// Every invariant a valid plan has, whatever the loads. Reports failures through gtest.
void ExpectConsistentPlan(const Matrix& weight, const ClusterShape& shape,
                          const ExpertPlacementPlan& plan) {
  const int num_experts = static_cast<int>(weight.front().size());
  ASSERT_EQ(plan.num_layers, static_cast<int>(weight.size()));
  ASSERT_EQ(plan.num_logical_experts, num_experts);
  ASSERT_EQ(plan.num_physical_experts, shape.num_replicas);
  ASSERT_EQ(plan.phy2log.size(), weight.size());
  ASSERT_EQ(plan.log2phy.size(), weight.size());
  ASSERT_EQ(plan.logcnt.size(), weight.size());
  int largest_count = 0;
  for (int layer = 0; layer < plan.num_layers; ++layer) {
    ASSERT_EQ(plan.phy2log[layer].size(), static_cast<size_t>(shape.num_replicas));
    ASSERT_EQ(plan.logcnt[layer].size(), static_cast<size_t>(num_experts));
    ASSERT_EQ(plan.log2phy[layer].size(),
              static_cast<size_t>(num_experts) * plan.max_replica_count);
    std::vector<int> slots_per_expert(num_experts, 0);
    for (const int expert : plan.phy2log[layer]) {
      ASSERT_GE(expert, 0);
      ASSERT_LT(expert, num_experts);
      ++slots_per_expert[expert];
    }
    int total = 0;
    std::set<int> slots_seen;
    for (int expert = 0; expert < num_experts; ++expert) {
      const int count = plan.logcnt[layer][expert];
      EXPECT_GE(count, 1) << "layer " << layer << " expert " << expert << " has no replica";
      EXPECT_EQ(count, slots_per_expert[expert]) << "logcnt disagrees with phy2log";
      total += count;
      largest_count = std::max(largest_count, count);
      for (int rank = 0; rank < plan.max_replica_count; ++rank) {
        const int slot = plan.Log2Phy(layer, expert, rank);
        if (rank >= count) {
          EXPECT_EQ(slot, -1) << "padding expected past the replica count";
          continue;
        }
        ASSERT_GE(slot, 0);
        ASSERT_LT(slot, shape.num_replicas);
        EXPECT_EQ(plan.phy2log[layer][slot], expert) << "log2phy points at another expert";
        EXPECT_TRUE(slots_seen.insert(slot).second) << "slot " << slot << " listed twice";
      }
    }
    EXPECT_EQ(total, shape.num_replicas);
    EXPECT_EQ(slots_seen.size(), static_cast<size_t>(shape.num_replicas));
  }
  EXPECT_EQ(plan.max_replica_count, largest_count);
}

TEST(RebalanceExpertsTest, ReproducesThePublishedExample) {
  const Matrix weight = {{90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86},
                         {20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27}};
  const ClusterShape shape{.num_replicas = 16, .num_groups = 4, .num_nodes = 2, .num_gpus = 8};
  const absl::StatusOr<ExpertPlacementPlan> plan = RebalanceExperts(weight, shape);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->policy, RebalancePolicy::kHierarchical);
  EXPECT_THAT(plan->phy2log[0], ElementsAre(5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1));
  EXPECT_THAT(plan->phy2log[1], ElementsAre(7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1));
  EXPECT_THAT(plan->logcnt[0], ElementsAre(1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1));
  EXPECT_THAT(plan->logcnt[1], ElementsAre(1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1));
  EXPECT_EQ(plan->max_replica_count, 2);
  ExpectConsistentPlan(weight, shape, *plan);
}

TEST(RebalanceExpertsTest, GlobalPolicyByHand) {
  // 3 groups on 2 nodes do not divide, so the policy is global (and 4 experts need not divide
  // into 3 groups). Replication: extra slots go to expert 0 (8, then 4 == 4 ties, lowest id),
  // leaving per-replica loads [8/3, 4, 2, 2, 8/3, 8/3] for slots s0..s5. Packing onto 2 GPUs
  // visits s1, s0, s4, s5, s2, s3: GPU 0 gets s1, s5, s3 and GPU 1 gets s0, s4, s2.
  const Matrix weight = {{8, 4, 2, 2}};
  const ClusterShape shape{.num_replicas = 6, .num_groups = 3, .num_nodes = 2, .num_gpus = 2};
  const absl::StatusOr<ExpertPlacementPlan> plan = RebalanceExperts(weight, shape);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->policy, RebalancePolicy::kGlobal);
  EXPECT_THAT(plan->phy2log[0], ElementsAre(1, 0, 3, 0, 0, 2));
  EXPECT_THAT(plan->logcnt[0], ElementsAre(3, 1, 1, 1));
  // Replica rank 0 is the original slot s0 (now slot 3); ranks 1 and 2 are s4 and s5. Two
  // replicas of expert 0 share GPU 1, which the published algorithm allows.
  EXPECT_THAT(Log2PhyRow(*plan, 0, 0), ElementsAre(3, 4, 1));
  EXPECT_THAT(Log2PhyRow(*plan, 0, 1), ElementsAre(0, -1, -1));
  EXPECT_THAT(Log2PhyRow(*plan, 0, 2), ElementsAre(5, -1, -1));
  EXPECT_THAT(Log2PhyRow(*plan, 0, 3), ElementsAre(2, -1, -1));
}

TEST(RebalanceExpertsTest, HierarchicalPolicyByHand) {
  // 4 groups of one expert, 2 nodes: groups by load 3, 2, 1, 0 go to nodes 0, 1, 1, 0, so node
  // 0 holds experts 3 then 0, node 1 holds 2 then 1. Each node replicates its hotter expert
  // into its one extra slot and keeps the two replicas first on its single GPU.
  const Matrix weight = {{1, 2, 10, 20}};
  const ClusterShape shape{.num_replicas = 6, .num_groups = 4, .num_nodes = 2, .num_gpus = 2};
  const absl::StatusOr<ExpertPlacementPlan> plan = RebalanceExperts(weight, shape);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->policy, RebalancePolicy::kHierarchical);
  EXPECT_THAT(plan->phy2log[0], ElementsAre(3, 3, 0, 2, 2, 1));
  EXPECT_THAT(plan->logcnt[0], ElementsAre(1, 1, 2, 2));
  EXPECT_THAT(Log2PhyRow(*plan, 0, 0), ElementsAre(2, -1));
  EXPECT_THAT(Log2PhyRow(*plan, 0, 1), ElementsAre(5, -1));
  EXPECT_THAT(Log2PhyRow(*plan, 0, 2), ElementsAre(3, 4));
  EXPECT_THAT(Log2PhyRow(*plan, 0, 3), ElementsAre(0, 1));
}

TEST(RebalanceExpertsTest, SameGroupsAsNodesKeepsGroupOnItsOwnNode) {
  // With one group per node the packing is the identity: group g stays on node g however
  // skewed the loads are.
  const Matrix weight = {{1, 1, 100, 100}};
  const ClusterShape shape{.num_replicas = 4, .num_groups = 2, .num_nodes = 2, .num_gpus = 2};
  const absl::StatusOr<ExpertPlacementPlan> plan = RebalanceExperts(weight, shape);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_THAT(plan->phy2log[0], ElementsAre(0, 1, 2, 3));
}

TEST(RebalanceExpertsTest, AllZeroLoadsGiveAValidPlan) {
  const Matrix weight = {{0, 0, 0, 0}, {0, 0, 0, 0}};
  const ClusterShape shape{.num_replicas = 8, .num_groups = 2, .num_nodes = 1, .num_gpus = 4};
  const absl::StatusOr<ExpertPlacementPlan> plan = RebalanceExperts(weight, shape);
  ASSERT_TRUE(plan.ok()) << plan.status();
  ExpectConsistentPlan(weight, shape, *plan);
}

// Each entry: a description, the weight, the shape, and a fragment the message must contain.
struct InvalidCase {
  const char* description;
  Matrix weight;
  ClusterShape shape;
  const char* message_fragment;
  // Whether ValidateRebalanceInput sees it too; the log2phy size is known only after solving.
  bool detected_before_solving = true;
};

const ClusterShape kSmallShape{.num_replicas = 4, .num_groups = 2, .num_nodes = 1, .num_gpus = 2};

TEST(RebalanceExpertsTest, RejectsEveryInvalidInputWithInvalidArgument) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<InvalidCase> cases = {
      {"no layers", {}, kSmallShape, "no layers"},
      {"empty rows", {{}, {}}, kSmallShape, "empty"},
      {"ragged rows", {{1, 2, 3, 4}, {1, 2, 3}}, kSmallShape, "ragged"},
      {"NaN load", {{1, nan, 3, 4}}, kSmallShape, "weight[0][1]"},
      {"infinite load", {{1, 2, inf, 4}}, kSmallShape, "finite"},
      {"negative infinite load", {{1, 2, 3, -inf}}, kSmallShape, "finite"},
      {"negative load", {{1, 2, 3, 4}, {1, -0.5f, 3, 4}}, kSmallShape, "weight[1][1]"},
      {"layer total overflows float32", {{FLT_MAX, FLT_MAX, 0, 0}}, kSmallShape, "float32"},
      {"zero replicas", {{1, 2}}, {0, 1, 1, 1}, "num_replicas must be at least 1"},
      {"negative replicas", {{1, 2}}, {-4, 1, 1, 1}, "num_replicas"},
      {"zero groups", {{1, 2}}, {2, 0, 1, 1}, "num_groups"},
      {"zero nodes", {{1, 2}}, {2, 1, 0, 1}, "num_nodes"},
      {"zero gpus", {{1, 2}}, {2, 1, 1, 0}, "num_gpus"},
      {"too many replicas", {{1, 2}}, {kMaxReplicas + 2, 1, 1, 2}, "at most"},
      {"replicas not a multiple of gpus", {{1, 2, 3, 4}}, {6, 1, 1, 4}, "multiple of num_gpus"},
      {"fewer replicas than experts", {{1, 2, 3, 4}}, {2, 1, 1, 2}, "at least the number"},
      {"hierarchical: experts not a multiple of groups",
       {{1, 2, 3, 4, 5, 6}},
       {8, 4, 2, 2},
       "multiple of num_groups"},
      {"hierarchical: gpus not a multiple of nodes",
       {{1, 2, 3, 4}},
       {6, 2, 2, 3},
       "multiple of num_nodes"},
      {"too many slots in one call",
       Matrix(kMaxTableEntries / kMaxReplicas + 1, std::vector<float>{1.0f}),
       {kMaxReplicas, 1, 1, 1},
       "slots"},
      // Expert 0 takes all 8188 extra slots, so log2phy rows are 8189 wide: 600 layers x 4
      // experts x 8189 entries exceeds the limit although phy2log (600 x 8192) does not.
      {"padded log2phy too large",
       Matrix(600, std::vector<float>{1, 0, 0, 0}),
       {8192, 1, 1, 1},
       "log2phy",
       false},
  };
  for (const InvalidCase& invalid : cases) {
    const absl::StatusOr<ExpertPlacementPlan> plan =
        RebalanceExperts(invalid.weight, invalid.shape);
    ASSERT_FALSE(plan.ok()) << invalid.description;
    EXPECT_EQ(plan.status().code(), absl::StatusCode::kInvalidArgument) << invalid.description;
    EXPECT_THAT(plan.status().message(), HasSubstr(invalid.message_fragment))
        << invalid.description;
    if (invalid.detected_before_solving) {
      EXPECT_EQ(ValidateRebalanceInput(invalid.weight, invalid.shape), plan.status())
          << invalid.description;
    }
  }
}

TEST(RebalanceExpertsTest, GlobalPolicyDoesNotNeedHierarchicalDivisibility) {
  // 4 groups on 3 nodes: global, so 6 experts need not divide into 4 groups and 4 GPUs need
  // not divide over 3 nodes.
  const Matrix weight = {{1, 2, 3, 4, 5, 6}};
  const ClusterShape shape{.num_replicas = 8, .num_groups = 4, .num_nodes = 3, .num_gpus = 4};
  const absl::StatusOr<ExpertPlacementPlan> plan = RebalanceExperts(weight, shape);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->policy, RebalancePolicy::kGlobal);
  ExpectConsistentPlan(weight, shape, *plan);
}

TEST(RebalanceExpertsTest, ZeroAndNegativeZeroLoadsAreAccepted) {
  const Matrix weight = {{0.0f, -0.0f, 1.0f, 2.0f}};
  EXPECT_TRUE(RebalanceExperts(weight, kSmallShape).ok());
}

Matrix RandomWeight(std::mt19937& generator, int num_layers, int num_experts, bool skewed) {
  std::uniform_real_distribution<float> uniform(0.0f, 1000.0f);
  std::lognormal_distribution<float> heavy_tailed(0.0f, 1.5f);
  Matrix weight(num_layers, std::vector<float>(num_experts));
  for (auto& row : weight) {
    for (float& load : row) load = skewed ? 100.0f * heavy_tailed(generator) : uniform(generator);
  }
  return weight;
}

struct PropertyShape {
  int num_layers;
  int num_experts;
  ClusterShape shape;
};

// Shapes covering both policies, with and without redundancy, including DeepSeek-V3's.
const std::vector<PropertyShape> kPropertyShapes = {
    {3, 256, {.num_replicas = 288, .num_groups = 8, .num_nodes = 4, .num_gpus = 32}},
    {4, 64, {.num_replicas = 80, .num_groups = 8, .num_nodes = 2, .num_gpus = 8}},
    {4, 64, {.num_replicas = 64, .num_groups = 4, .num_nodes = 4, .num_gpus = 16}},
    {4, 60, {.num_replicas = 72, .num_groups = 5, .num_nodes = 2, .num_gpus = 8}},
    {4, 32, {.num_replicas = 48, .num_groups = 1, .num_nodes = 1, .num_gpus = 4}},
    {4, 48, {.num_replicas = 96, .num_groups = 6, .num_nodes = 3, .num_gpus = 12}},
};

TEST(RebalanceExpertsPropertyTest, PlansAreConsistentOnRandomLoads) {
  std::mt19937 generator(2024);
  for (const PropertyShape& property_shape : kPropertyShapes) {
    for (const bool skewed : {false, true}) {
      const Matrix weight =
          RandomWeight(generator, property_shape.num_layers, property_shape.num_experts, skewed);
      const absl::StatusOr<ExpertPlacementPlan> plan =
          RebalanceExperts(weight, property_shape.shape);
      ASSERT_TRUE(plan.ok()) << plan.status();
      SCOPED_TRACE(testing::Message() << property_shape.num_experts << " experts, "
                                      << property_shape.shape.num_replicas << " slots");
      ExpectConsistentPlan(weight, property_shape.shape, *plan);
      EXPECT_EQ(plan->slots_per_gpu() * property_shape.shape.num_gpus,
                property_shape.shape.num_replicas);
    }
  }
}

TEST(RebalanceExpertsPropertyTest, HierarchicalReplicasStayOnTheirGroupsNode) {
  std::mt19937 generator(99);
  for (const PropertyShape& property_shape : kPropertyShapes) {
    const ClusterShape& shape = property_shape.shape;
    if (ChoosePolicy(shape) != RebalancePolicy::kHierarchical) continue;
    const Matrix weight =
        RandomWeight(generator, property_shape.num_layers, property_shape.num_experts, true);
    const absl::StatusOr<ExpertPlacementPlan> plan = RebalanceExperts(weight, shape);
    ASSERT_TRUE(plan.ok()) << plan.status();
    const int experts_per_group = property_shape.num_experts / shape.num_groups;
    const int slots_per_node = shape.num_replicas / shape.num_nodes;
    for (int layer = 0; layer < plan->num_layers; ++layer) {
      std::vector<int> node_of_group(shape.num_groups, -1);
      std::vector<int> groups_on_node(shape.num_nodes, 0);
      for (int slot = 0; slot < shape.num_replicas; ++slot) {
        const int group = plan->phy2log[layer][slot] / experts_per_group;
        const int node = slot / slots_per_node;
        if (node_of_group[group] < 0) {
          node_of_group[group] = node;
          ++groups_on_node[node];
        }
        EXPECT_EQ(node_of_group[group], node)
            << "layer " << layer << ": group " << group << " spans two nodes";
      }
      for (int node = 0; node < shape.num_nodes; ++node) {
        EXPECT_EQ(groups_on_node[node], shape.num_groups / shape.num_nodes);
      }
    }
  }
}

TEST(RebalanceExpertsPropertyTest, NeverLessBalancedThanWithoutRedundancy) {
  std::mt19937 generator(5);
  for (const PropertyShape& property_shape : kPropertyShapes) {
    for (const bool skewed : {false, true}) {
      const Matrix weight =
          RandomWeight(generator, property_shape.num_layers, property_shape.num_experts, skewed);
      const absl::StatusOr<ExpertPlacementPlan> plan =
          RebalanceExperts(weight, property_shape.shape);
      ASSERT_TRUE(plan.ok()) << plan.status();
      const auto before = MeasureStaticBalance(weight, property_shape.shape.num_gpus);
      const auto after = MeasureBalance(weight, plan->phy2log, property_shape.shape.num_gpus);
      ASSERT_TRUE(before.ok() && after.ok());
      for (int layer = 0; layer < plan->num_layers; ++layer) {
        EXPECT_GE((*after)[layer].balancedness(), (*before)[layer].balancedness())
            << property_shape.num_experts << " experts, layer " << layer;
      }
    }
  }
}

TEST(RebalanceExpertsPropertyTest, RandomShapesGiveAPlanOrInvalidArgument) {
  // Arbitrary small shapes, valid or not, must never crash: either a consistent plan or
  // InvalidArgument.
  std::mt19937 generator(31337);
  std::uniform_int_distribution<int> small(-1, 9);
  int num_valid = 0;
  for (int trial = 0; trial < 3000; ++trial) {
    const int num_experts = std::uniform_int_distribution<int>(1, 12)(generator);
    const int num_layers = std::uniform_int_distribution<int>(1, 3)(generator);
    const ClusterShape shape{.num_replicas = std::uniform_int_distribution<int>(-1, 30)(generator),
                             .num_groups = small(generator),
                             .num_nodes = small(generator),
                             .num_gpus = small(generator)};
    const Matrix weight = RandomWeight(generator, num_layers, num_experts, trial % 2 == 0);
    const absl::StatusOr<ExpertPlacementPlan> plan = RebalanceExperts(weight, shape);
    if (!plan.ok()) {
      ASSERT_EQ(plan.status().code(), absl::StatusCode::kInvalidArgument) << plan.status();
      continue;
    }
    ++num_valid;
    ExpectConsistentPlan(weight, shape, *plan);
  }
  EXPECT_GT(num_valid, 100) << "the random shapes should include plenty of valid ones";
}

TEST(RebalancePolicyTest, HierarchicalExactlyWhenGroupsDivideByNodes) {
  EXPECT_EQ(ChoosePolicy({.num_replicas = 16, .num_groups = 4, .num_nodes = 2, .num_gpus = 8}),
            RebalancePolicy::kHierarchical);
  EXPECT_EQ(ChoosePolicy({.num_replicas = 16, .num_groups = 3, .num_nodes = 2, .num_gpus = 8}),
            RebalancePolicy::kGlobal);
  EXPECT_EQ(RebalancePolicyName(RebalancePolicy::kHierarchical), "hierarchical");
  EXPECT_EQ(RebalancePolicyName(RebalancePolicy::kGlobal), "global");
}

}  // namespace
}  // namespace moeserve::eplb
