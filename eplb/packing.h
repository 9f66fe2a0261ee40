// The two greedy building blocks of DeepSeek's EPLB algorithm, one load row at a time:
// balanced packing (items onto equally sized packs) and replication (experts onto slots).
//
// Callers: eplb/rebalance.cc, which validates every input first, and the unit tests that check
// the steps by hand. These functions assume valid input (see each precondition) and do not
// re-check it; code outside eplb/ should call RebalanceExperts (eplb/rebalance.h) instead.
//
// Thread-safety: pure functions of their arguments; safe to call concurrently.

#ifndef MOESERVE_EPLB_PACKING_H_
#define MOESERVE_EPLB_PACKING_H_

#include <span>
#include <vector>

namespace moeserve::eplb {

// Where balanced packing put each item: item i went to pack `pack_of_item[i]` as that pack's
// `rank_in_pack[i]`-th item (0-based, in the order items were placed).
struct PackAssignment {
  std::vector<int> pack_of_item;
  std::vector<int> rank_in_pack;
};

// Packs `item_loads.size()` items into `num_packs` packs of exactly size/num_packs items each,
// keeping pack loads close. With one item per pack, item i goes to pack i. Otherwise items are
// visited by load, heaviest first (equal loads in index order), and each goes to the lightest
// pack that still has room (lowest pack index among equally light ones). Pack loads accumulate
// in float32 in visiting order, like the reference, so near-ties resolve the same way.
//
// Preconditions: num_packs >= 1, item_loads.size() % num_packs == 0, loads finite.
PackAssignment BalancedPacking(std::span<const float> item_loads, int num_packs);

// Where replication put each slot: slot s holds expert `expert_of_slot[s]` as its
// `replica_rank_of_slot[s]`-th replica; expert e ended with `replica_count[e]` replicas.
struct Replication {
  std::vector<int> expert_of_slot;
  std::vector<int> replica_rank_of_slot;
  std::vector<int> replica_count;
};

// Spreads `expert_loads.size()` experts over `num_slots` slots. Slot i < num_experts holds expert
// i (replica rank 0). Each further slot goes to the expert whose load per replica
// (load / replica count, computed in float32) is highest, lowest expert index on equal values;
// that expert's count then grows by one. This minimises the largest per-replica load greedily.
//
// Preconditions: num_slots >= expert_loads.size() >= 1, loads finite and non-negative.
Replication ReplicateExperts(std::span<const float> expert_loads, int num_slots);

}  // namespace moeserve::eplb

#endif  // MOESERVE_EPLB_PACKING_H_
