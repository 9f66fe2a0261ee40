#include "eplb/packing.h"

#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <numeric>

namespace moeserve::eplb {

PackAssignment BalancedPacking(std::span<const float> item_loads, int num_packs) {
  const int num_items = static_cast<int>(item_loads.size());
  const int items_per_pack = num_items / num_packs;
  PackAssignment assignment;
  assignment.pack_of_item.assign(num_items, -1);
  assignment.rank_in_pack.assign(num_items, 0);

  if (items_per_pack == 1) {
    // The reference skips the greedy pass here: the identity is already a valid packing and
    // keeps, for example, group g on node g when there are as many groups as nodes.
    std::iota(assignment.pack_of_item.begin(), assignment.pack_of_item.end(), 0);
    return assignment;
  }

  // Heaviest first, equal loads in index order (what a stable sort gives). The reference's sort
  // promises no order among equal loads, but in practice they arise between replicas of one
  // expert, and swapping those changes replica ranks, not which expert sits in which slot.
  //
  // Sorting one 64-bit key per item is several times faster than comparing loads indirectly:
  // the bits of a non-negative float order like the float itself, so (inverted load bits,
  // index) ascending is (load descending, index ascending).
  std::vector<uint64_t> visiting_keys(num_items);
  for (int item = 0; item < num_items; ++item) {
    // + 0.0f turns -0.0 into +0.0, whose bits are all zero like the equal 0.0.
    const uint32_t load_bits = std::bit_cast<uint32_t>(item_loads[item] + 0.0f);
    visiting_keys[item] = (static_cast<uint64_t>(~load_bits) << 32) | static_cast<uint32_t>(item);
  }
  std::sort(visiting_keys.begin(), visiting_keys.end());

  // The lightest pack with room is kept on top of a heap ordered by (load, pack index), which
  // picks exactly what a scan over all packs would, in O(log packs) instead of O(packs).
  struct Pack {
    float load;
    int index;
    int size;
  };
  const auto lighter_on_top = [](const Pack& a, const Pack& b) {
    return a.load > b.load || (a.load == b.load && a.index > b.index);
  };
  std::vector<Pack> packs_with_room(num_packs);
  for (int pack = 0; pack < num_packs; ++pack) packs_with_room[pack] = {0.0f, pack, 0};
  std::make_heap(packs_with_room.begin(), packs_with_room.end(), lighter_on_top);
  for (const uint64_t key : visiting_keys) {
    const int item = static_cast<int>(key & 0xffffffffu);
    std::pop_heap(packs_with_room.begin(), packs_with_room.end(), lighter_on_top);
    Pack& lightest = packs_with_room.back();
    assignment.pack_of_item[item] = lightest.index;
    assignment.rank_in_pack[item] = lightest.size;
    lightest.load += item_loads[item];  // float32, as in the reference
    if (++lightest.size == items_per_pack) {
      packs_with_room.pop_back();
    } else {
      std::push_heap(packs_with_room.begin(), packs_with_room.end(), lighter_on_top);
    }
  }
  return assignment;
}

Replication ReplicateExperts(std::span<const float> expert_loads, int num_slots) {
  const int num_experts = static_cast<int>(expert_loads.size());
  Replication replication;
  replication.expert_of_slot.resize(num_slots);
  replication.replica_rank_of_slot.assign(num_slots, 0);
  replication.replica_count.assign(num_experts, 1);
  std::iota(replication.expert_of_slot.begin(), replication.expert_of_slot.begin() + num_experts,
            0);

  // Experts on a heap ordered by (load per replica, lower index first): the top is exactly what
  // a scan for the highest value would pick, in O(log experts) per redundant slot.
  struct Candidate {
    float load_per_replica;
    int expert;
  };
  const auto hotter_on_top = [](const Candidate& a, const Candidate& b) {
    return a.load_per_replica < b.load_per_replica ||
           (a.load_per_replica == b.load_per_replica && a.expert > b.expert);
  };
  std::vector<Candidate> candidates(num_experts);
  for (int expert = 0; expert < num_experts; ++expert) {
    candidates[expert] = {expert_loads[expert], expert};
  }
  std::make_heap(candidates.begin(), candidates.end(), hotter_on_top);
  for (int slot = num_experts; slot < num_slots; ++slot) {
    std::pop_heap(candidates.begin(), candidates.end(), hotter_on_top);
    Candidate& hottest = candidates.back();
    replication.expert_of_slot[slot] = hottest.expert;
    replication.replica_rank_of_slot[slot] = replication.replica_count[hottest.expert];
    const int new_count = ++replication.replica_count[hottest.expert];
    // Same float32 division as the reference's weight / logcnt.
    hottest.load_per_replica = expert_loads[hottest.expert] / static_cast<float>(new_count);
    std::push_heap(candidates.begin(), candidates.end(), hotter_on_top);
  }
  return replication;
}

}  // namespace moeserve::eplb
