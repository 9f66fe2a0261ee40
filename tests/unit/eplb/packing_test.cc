// Balanced packing and replication, checked by hand on small inputs and against a plain
// linear-scan transcription of the published rules on random inputs full of ties.

#include "eplb/packing.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <random>
#include <vector>

namespace moeserve::eplb {
namespace {

using ::testing::ElementsAre;

// The packing rules read literally: scan for the heaviest unvisited item and for the lightest
// pack with room, lowest index winning every tie.
PackAssignment LinearScanPacking(const std::vector<float>& loads, int num_packs) {
  const int num_items = static_cast<int>(loads.size());
  const int items_per_pack = num_items / num_packs;
  PackAssignment result{std::vector<int>(num_items, -1), std::vector<int>(num_items, 0)};
  if (items_per_pack == 1) {
    for (int i = 0; i < num_items; ++i) result.pack_of_item[i] = i;
    return result;
  }
  std::vector<float> pack_load(num_packs, 0.0f);
  std::vector<int> pack_size(num_packs, 0);
  std::vector<bool> visited(num_items, false);
  for (int step = 0; step < num_items; ++step) {
    int item = -1;
    for (int i = 0; i < num_items; ++i) {
      if (!visited[i] && (item < 0 || loads[i] > loads[item])) item = i;
    }
    visited[item] = true;
    int pack = -1;
    for (int p = 0; p < num_packs; ++p) {
      if (pack_size[p] < items_per_pack && (pack < 0 || pack_load[p] < pack_load[pack])) pack = p;
    }
    result.pack_of_item[item] = pack;
    result.rank_in_pack[item] = pack_size[pack]++;
    pack_load[pack] += loads[item];
  }
  return result;
}

Replication LinearScanReplication(const std::vector<float>& loads, int num_slots) {
  const int num_experts = static_cast<int>(loads.size());
  Replication result{std::vector<int>(num_slots), std::vector<int>(num_slots, 0),
                     std::vector<int>(num_experts, 1)};
  for (int slot = 0; slot < num_experts; ++slot) result.expert_of_slot[slot] = slot;
  for (int slot = num_experts; slot < num_slots; ++slot) {
    int best = 0;
    for (int e = 1; e < num_experts; ++e) {
      if (loads[e] / static_cast<float>(result.replica_count[e]) >
          loads[best] / static_cast<float>(result.replica_count[best])) {
        best = e;
      }
    }
    result.expert_of_slot[slot] = best;
    result.replica_rank_of_slot[slot] = result.replica_count[best]++;
  }
  return result;
}

TEST(BalancedPackingTest, HeaviestItemGoesToLightestPack) {
  // Visit order 5, 4, 2, 1: 5 -> pack 0, 4 -> pack 1, 2 -> pack 1 (4 < 5), 1 -> pack 0.
  const PackAssignment packing = BalancedPacking(std::vector<float>{5, 1, 4, 2}, 2);
  EXPECT_THAT(packing.pack_of_item, ElementsAre(0, 0, 1, 1));
  EXPECT_THAT(packing.rank_in_pack, ElementsAre(0, 1, 0, 1));
}

TEST(BalancedPackingTest, OneItemPerPackIsTheIdentity) {
  const PackAssignment packing = BalancedPacking(std::vector<float>{3, 1, 2}, 3);
  EXPECT_THAT(packing.pack_of_item, ElementsAre(0, 1, 2));
  EXPECT_THAT(packing.rank_in_pack, ElementsAre(0, 0, 0));
}

TEST(BalancedPackingTest, FullPacksTakeNoMoreItems) {
  // 10 -> pack 0; both 1s after it go to the lighter pack 1, which is then full, so the last 1
  // must go to the heavy pack 0.
  const PackAssignment packing = BalancedPacking(std::vector<float>{10, 1, 1, 1}, 2);
  EXPECT_THAT(packing.pack_of_item, ElementsAre(0, 1, 1, 0));
  EXPECT_THAT(packing.rank_in_pack, ElementsAre(0, 0, 1, 1));
}

TEST(BalancedPackingTest, EqualPackLoadsPickLowestPackAndEqualItemsGoInIndexOrder) {
  const PackAssignment packing = BalancedPacking(std::vector<float>{2, 2, 2, 2}, 2);
  EXPECT_THAT(packing.pack_of_item, ElementsAre(0, 1, 0, 1));
  EXPECT_THAT(packing.rank_in_pack, ElementsAre(0, 0, 1, 1));
}

TEST(BalancedPackingTest, PackLoadsAccumulateInFloat32) {
  // 2^24 + 1 rounds to 2^24 in float32. After 2^24 -> pack 0, 2^24-1 -> pack 1, 1 -> pack 1,
  // 1 -> pack 0 (tie), both packs read 2^24, so the fifth item (a 1) goes to pack 0. Summing in
  // double would see pack 0 at 2^24+1 and send it to pack 1.
  const PackAssignment packing =
      BalancedPacking(std::vector<float>{16777216.0f, 16777215.0f, 1, 1, 1, 1}, 2);
  EXPECT_THAT(packing.pack_of_item, ElementsAre(0, 1, 1, 0, 0, 1));
  EXPECT_THAT(packing.rank_in_pack, ElementsAre(0, 0, 1, 1, 2, 2));
}

TEST(BalancedPackingTest, MatchesLinearScanOnRandomLoadsWithTies) {
  std::mt19937 generator(7);
  for (int trial = 0; trial < 500; ++trial) {
    const int num_packs = std::uniform_int_distribution<int>(1, 9)(generator);
    const int items_per_pack = std::uniform_int_distribution<int>(1, 12)(generator);
    // Few distinct values make ties common; fractional values exercise float rounding.
    std::uniform_int_distribution<int> value(0, trial % 2 == 0 ? 4 : 1000);
    std::vector<float> loads(num_packs * items_per_pack);
    for (float& load : loads) load = static_cast<float>(value(generator)) / 3.0f;
    const PackAssignment expected = LinearScanPacking(loads, num_packs);
    const PackAssignment actual = BalancedPacking(loads, num_packs);
    ASSERT_EQ(actual.pack_of_item, expected.pack_of_item) << "trial " << trial;
    ASSERT_EQ(actual.rank_in_pack, expected.rank_in_pack) << "trial " << trial;
  }
}

TEST(ReplicateExpertsTest, HottestExpertPerReplicaGetsEachExtraSlot) {
  // Extra slot 3: 10 is hottest (-> 5 per replica). Slot 4: 5 > 4, expert 0 again.
  const Replication replication = ReplicateExperts(std::vector<float>{10, 4, 1}, 5);
  EXPECT_THAT(replication.expert_of_slot, ElementsAre(0, 1, 2, 0, 0));
  EXPECT_THAT(replication.replica_rank_of_slot, ElementsAre(0, 0, 0, 1, 2));
  EXPECT_THAT(replication.replica_count, ElementsAre(3, 1, 1));
}

TEST(ReplicateExpertsTest, EqualLoadsPerReplicaPickLowestExpert) {
  const Replication replication = ReplicateExperts(std::vector<float>{4, 6, 6}, 4);
  EXPECT_THAT(replication.expert_of_slot, ElementsAre(0, 1, 2, 1));
  EXPECT_THAT(replication.replica_count, ElementsAre(1, 2, 1));
  // 8 / 2 == 4: expert 0 (4 per replica) ties with expert 1 and wins on index.
  const Replication tie = ReplicateExperts(std::vector<float>{4, 8}, 3);
  EXPECT_THAT(tie.expert_of_slot, ElementsAre(0, 1, 1));
  const Replication next = ReplicateExperts(std::vector<float>{4, 8}, 4);
  EXPECT_THAT(next.expert_of_slot, ElementsAre(0, 1, 1, 0));
}

TEST(ReplicateExpertsTest, NoExtraSlotsMeansOneReplicaEach) {
  const Replication replication = ReplicateExperts(std::vector<float>{1, 2}, 2);
  EXPECT_THAT(replication.expert_of_slot, ElementsAre(0, 1));
  EXPECT_THAT(replication.replica_count, ElementsAre(1, 1));
}

TEST(ReplicateExpertsTest, AllZeroLoadsStillFillEverySlot) {
  const Replication replication = ReplicateExperts(std::vector<float>{0, 0}, 4);
  EXPECT_THAT(replication.expert_of_slot, ElementsAre(0, 1, 0, 0));
  EXPECT_THAT(replication.replica_rank_of_slot, ElementsAre(0, 0, 1, 2));
  EXPECT_THAT(replication.replica_count, ElementsAre(3, 1));
}

TEST(ReplicateExpertsTest, MatchesLinearScanOnRandomLoadsWithTies) {
  std::mt19937 generator(11);
  for (int trial = 0; trial < 500; ++trial) {
    const int num_experts = std::uniform_int_distribution<int>(1, 40)(generator);
    const int num_slots = num_experts + std::uniform_int_distribution<int>(0, 60)(generator);
    std::uniform_int_distribution<int> value(0, trial % 2 == 0 ? 6 : 100000);
    std::vector<float> loads(num_experts);
    for (float& load : loads) load = static_cast<float>(value(generator));
    const Replication expected = LinearScanReplication(loads, num_slots);
    const Replication actual = ReplicateExperts(loads, num_slots);
    ASSERT_EQ(actual.expert_of_slot, expected.expert_of_slot) << "trial " << trial;
    ASSERT_EQ(actual.replica_rank_of_slot, expected.replica_rank_of_slot) << "trial " << trial;
    ASSERT_EQ(actual.replica_count, expected.replica_count) << "trial " << trial;
  }
}

}  // namespace
}  // namespace moeserve::eplb
