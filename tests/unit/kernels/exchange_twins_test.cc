// The device-planned exchange's twins (cpu_twins.h: PlanDestinationsTwin, PlanReceivedTwin)
// against the host's dispatch plan (parallel::PlanDispatch), and a whole exchange between
// simulated GPUs: every (token, expert) pair must come back with the result of the slot the host
// plan picks, and an overflow anywhere must be seen by every rank.
#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "engine/parallel/ep_forward.h"
#include "engine/placement/expert_placement.h"
#include "kernels/cpu_twins.h"
#include "tests/unit/kernels/random_routing.h"

namespace moeserve::kernels {
namespace {

constexpr int kLayer = 1;

using testing::RandomRouting;

struct ReplicaTable {
  std::vector<int32_t> begin, slots;
};
ReplicaTable TableOf(const engine::ExpertPlacement& placement, int experts) {
  ReplicaTable table;
  table.begin.assign(experts + 1, 0);
  for (int e = 0; e < experts; ++e) {
    for (int32_t slot : placement.replicas(kLayer, e)) table.slots.push_back(slot);
    table.begin[e + 1] = static_cast<int32_t>(table.slots.size());
  }
  return table;
}

const int32_t* Header(const std::vector<uint16_t>& buffer, const ExchangeShape& shape, int p) {
  return reinterpret_cast<const int32_t*>(buffer.data() + shape.BlockOffset(p));
}

TEST(ExchangeTwins, PlanDestinationsSendsWhatTheDispatchPlanSends) {
  const int experts = 16, ranks = 4, slots = 24, tokens = 29, top_k = 4, rank = 2;
  const int slots_per_rank = slots / ranks;
  const engine::ExpertPlacement placement =
      engine::ExpertPlacement::Default(/*num_layers=*/2, experts, slots);
  const ReplicaTable table = TableOf(placement, experts);
  const std::vector<int32_t> routed = RandomRouting(tokens, top_k, experts, 5);
  const ExchangeShape shape{ranks, /*rows=*/tokens, /*entries=*/tokens * top_k, /*hidden=*/64};
  std::vector<uint16_t> dispatch(shape.dispatch_rows() * shape.hidden);
  std::vector<int32_t> index(shape.dispatch_rows()), positions(tokens * top_k, -7);
  PlanDestinationsTwin(routed.data(), tokens, top_k, table.begin.data(), table.slots.data(),
                       slots_per_rank, rank, shape, dispatch.data(), index.data(),
                       positions.data());

  const engine::parallel::DispatchPlan plan =
      engine::parallel::PlanDispatch(routed, top_k, kLayer, placement, rank, ranks);
  int64_t first_row = 0, first_entry = 0;
  for (int p = 0; p < ranks; ++p) {
    const int32_t* header = Header(dispatch, shape, p);
    EXPECT_EQ(header[0], plan.send_rows[p]) << "destination " << p;
    EXPECT_EQ(header[1], plan.send_entries[p]) << "destination " << p;
    EXPECT_EQ(header[2], 0) << "nothing overflowed";
    for (int r = 0; r < shape.header_rows(); ++r) {
      EXPECT_EQ(index[static_cast<int64_t>(p) * shape.block_rows() + r], -1);
    }
    for (int r = 0; r < shape.rows; ++r) {
      const int32_t expected = r < plan.send_rows[p] ? plan.sent_token[first_row + r] : -1;
      EXPECT_EQ(index[shape.DispatchRow(p, r)], expected) << "destination " << p << " row " << r;
    }
    for (int e = 0; e < plan.send_entries[p]; ++e) {
      const engine::parallel::DispatchEntry& entry = plan.entries[first_entry + e];
      EXPECT_EQ(header[ExchangeShape::kHeaderInts + 2 * e], entry.slot);
      EXPECT_EQ(header[ExchangeShape::kHeaderInts + 2 * e + 1], entry.row);
      EXPECT_EQ(positions[plan.sent_assignment[first_entry + e]], p * shape.entries + e);
    }
    first_row += plan.send_rows[p];
    first_entry += plan.send_entries[p];
  }
}

// A group of simulated GPUs: each plans its own tokens, the blocks go through an all-to-all, each
// groups what it received by slot, its "experts" stamp a row with who served it, and the
// results come back. Row values are small integers, exact in bf16.
struct SimulatedGroup {
  int ranks, slots_per_rank, top_k, experts;
  ExchangeShape shape;
  engine::ExpertPlacement placement;
  ReplicaTable table;
  std::vector<std::vector<int32_t>> routed;     // per rank
  std::vector<std::vector<int32_t>> positions;  // per rank
  std::vector<int32_t> overflow;                // per rank, after PlanReceived
  std::vector<std::vector<uint16_t>> returned;  // per rank: the combine's rows

  void Run(const std::vector<int>& tokens, int corrupt_rank = -1) {
    const int hidden = shape.hidden;
    std::vector<std::vector<uint16_t>> sent(ranks), received(ranks);
    std::vector<std::vector<int32_t>> index(ranks);
    positions.assign(ranks, {});
    for (int r = 0; r < ranks; ++r) {
      std::vector<uint16_t> x(static_cast<size_t>(tokens[r]) * hidden, 0);
      for (int t = 0; t < tokens[r]; ++t) {
        x[t * hidden + 0] = FloatToBf16(static_cast<float>(r));
        x[t * hidden + 1] = FloatToBf16(static_cast<float>(t));
      }
      sent[r].assign(shape.dispatch_rows() * hidden, 0);
      index[r].assign(shape.dispatch_rows(), 0);
      positions[r].assign(static_cast<size_t>(tokens[r]) * top_k, -1);
      PlanDestinationsTwin(routed[r].data(), tokens[r], top_k, table.begin.data(),
                           table.slots.data(), slots_per_rank, r, shape, sent[r].data(),
                           index[r].data(), positions[r].data());
      for (int64_t row = 0; row < shape.dispatch_rows(); ++row) {  // GatherRows
        if (index[r][row] < 0) continue;
        std::copy_n(x.begin() + static_cast<int64_t>(index[r][row]) * hidden, hidden,
                    sent[r].begin() + row * hidden);
      }
    }
    if (corrupt_rank >= 0) {  // an entry naming a slot the receiver does not have
      auto* header = reinterpret_cast<int32_t*>(sent[corrupt_rank].data());
      header[ExchangeShape::kHeaderInts] = slots_per_rank + 3;
    }
    const int64_t block = shape.BlockOffset(1);
    for (int q = 0; q < ranks; ++q) {  // all-to-all: q receives block q of every sender
      received[q].assign(shape.dispatch_rows() * hidden, 0);
      for (int r = 0; r < ranks; ++r) {
        std::copy_n(sent[r].begin() + q * block, block, received[q].begin() + r * block);
      }
    }
    overflow.assign(ranks, 0);
    std::vector<std::vector<uint16_t>> results(ranks);
    for (int q = 0; q < ranks; ++q) {
      std::vector<int32_t> offsets(slots_per_rank + 1), source(shape.combine_rows()),
          grouped(shape.combine_rows());
      PlanReceivedTwin(received[q].data(), shape, slots_per_rank, offsets.data(), source.data(),
                       grouped.data(), nullptr, &overflow[q]);
      std::vector<uint16_t> y(shape.combine_rows() * hidden, 0);
      for (int s = 0; s < slots_per_rank; ++s) {
        for (int g = offsets[s]; g < offsets[s + 1]; ++g) {
          const uint16_t* in = received[q].data() + static_cast<int64_t>(source[g]) * hidden;
          y[g * hidden + 0] = in[0];
          y[g * hidden + 1] = in[1];
          y[g * hidden + 2] = FloatToBf16(static_cast<float>(q));
          y[g * hidden + 3] = FloatToBf16(static_cast<float>(s));
        }
      }
      results[q].assign(shape.combine_rows() * hidden, 0);
      for (int64_t e = 0; e < shape.combine_rows(); ++e) {  // GatherRows through grouped rows
        if (grouped[e] < 0) continue;
        std::copy_n(y.begin() + static_cast<int64_t>(grouped[e]) * hidden, hidden,
                    results[q].begin() + e * hidden);
      }
    }
    const int64_t combine_block = static_cast<int64_t>(shape.entries) * hidden;
    for (int r = 0; r < ranks; ++r) {  // the combine: r gets back block r of every expert side
      returned[r].assign(shape.combine_rows() * hidden, 0);
      for (int q = 0; q < ranks; ++q) {
        std::copy_n(results[q].begin() + r * combine_block, combine_block,
                    returned[r].begin() + q * combine_block);
      }
    }
  }
};

SimulatedGroup MakeGroup(int ranks, int experts, int slots, int top_k, int rows, int entries) {
  SimulatedGroup group{ranks,
                       slots / ranks,
                       top_k,
                       experts,
                       {ranks, rows, entries, /*hidden=*/8},
                       engine::ExpertPlacement::Default(/*num_layers=*/2, experts, slots),
                       {},
                       {},
                       {},
                       {},
                       std::vector<std::vector<uint16_t>>(ranks)};
  group.table = TableOf(group.placement, experts);
  return group;
}

TEST(ExchangeTwins, EveryPairGetsTheResultOfTheSlotTheHostPlanPicks) {
  const int ranks = 4, experts = 16, slots = 24, top_k = 4;
  const std::vector<int> tokens = {13, 0, 7, 21};  // a rank without tokens still exchanges
  SimulatedGroup group = MakeGroup(ranks, experts, slots, top_k, /*rows=*/21,
                                   /*entries=*/21 * top_k);
  for (int r = 0; r < ranks; ++r) {
    group.routed.push_back(RandomRouting(tokens[r], top_k, experts, 100 + r));
  }
  group.Run(tokens);
  for (int r = 0; r < ranks; ++r) {
    EXPECT_EQ(group.overflow[r], 0) << "rank " << r;
    const engine::parallel::DispatchPlan plan =
        engine::parallel::PlanDispatch(group.routed[r], top_k, kLayer, group.placement, r, ranks);
    int64_t first_entry = 0;
    for (int p = 0; p < ranks; ++p) {
      for (int e = 0; e < plan.send_entries[p]; ++e) {
        const int pair = plan.sent_assignment[first_entry + e];
        const uint16_t* row = group.returned[r].data() +
                              static_cast<int64_t>(group.positions[r][pair]) * group.shape.hidden;
        EXPECT_EQ(Bf16ToFloat(row[0]), r) << "rank " << r << " pair " << pair;
        EXPECT_EQ(Bf16ToFloat(row[1]), pair / top_k) << "rank " << r << " pair " << pair;
        EXPECT_EQ(Bf16ToFloat(row[2]), p) << "served on the plan's GPU";
        EXPECT_EQ(Bf16ToFloat(row[3]), plan.entries[first_entry + e].slot) << "and slot";
      }
      first_entry += plan.send_entries[p];
    }
  }
}

TEST(ExchangeTwins, AnOverflowOrACorruptEntryIsSeenByEveryRank) {
  const int ranks = 4, experts = 16, slots = 16, top_k = 4;
  // Rank 3 sends all its 40 tokens to experts 0-3, which GPU 0 holds (one slot per expert):
  // only GPU 0 receives too much, the others learn it from rank 3's headers.
  const std::vector<int> tokens = {3, 3, 3, 40};
  SimulatedGroup group = MakeGroup(ranks, experts, slots, top_k, /*rows=*/16, /*entries=*/24);
  for (int r = 0; r < 3; ++r) {
    group.routed.push_back(RandomRouting(tokens[r], top_k, experts, 200 + r));
  }
  group.routed.emplace_back();
  for (int t = 0; t < tokens[3]; ++t) {
    for (int j = 0; j < top_k; ++j) group.routed[3].push_back(j);
  }
  group.Run(tokens);
  for (int r = 0; r < ranks; ++r) EXPECT_EQ(group.overflow[r], 1) << "rank " << r;

  // Within the capacities nothing is flagged; a corrupt entry from one rank then reaches one
  // receiver, which flags it.
  const std::vector<int> fewer = {3, 3, 3, 3};
  group.Run(fewer);
  for (int r = 0; r < ranks; ++r) EXPECT_EQ(group.overflow[r], 0) << "rank " << r;
  group.Run(fewer, /*corrupt_rank=*/1);
  EXPECT_EQ(group.overflow[0], 1) << "block 0 of rank 1 went to rank 0";
}

// The capacities: twice an even share plus 8, never more than a token can send one GPU, for a
// batch rounded up to a power of two; a fixed capacity where one is set.
TEST(ExchangeShape, SizesCapacitiesFromTheBatch) {
  // DeepSeek-V3 over 8 GPUs (32 slots each), 100 tokens a GPU: 128 tokens x 8 / 8 GPUs = 128
  // entries an even share, so 264 entries and 128 rows.
  const ExchangeShape ep8 = ExchangeShape::ForBatch(8, 100, 8, 32, 7168, 2.0, 0);
  EXPECT_EQ(ep8, (ExchangeShape{8, 128, 264, 7168}));
  EXPECT_EQ(ep8.header_rows(), 1);  // (4 + 528) ints fit a 14 KB row
  EXPECT_EQ(ep8.dispatch_rows(), 8 * 129);
  EXPECT_EQ(ep8.combine_rows(), 8 * 264);
  // One token: 8 + 2 entries, but at most its 8 experts.
  EXPECT_EQ(ExchangeShape::ForBatch(8, 1, 8, 32, 7168, 2.0, 0), (ExchangeShape{8, 1, 8, 7168}));
  // Two slots a GPU: a token sends it at most 2 entries.
  EXPECT_EQ(ExchangeShape::ForBatch(4, 8, 4, 2, 256, 2.0, 0).entries, 16);
  // Doubled headroom, and a fixed capacity.
  EXPECT_EQ(ExchangeShape::ForBatch(8, 128, 8, 32, 7168, 4.0, 0).entries, 520);
  EXPECT_EQ(ExchangeShape::ForBatch(8, 128, 8, 32, 7168, 2.0, 3), (ExchangeShape{8, 3, 3, 7168}));
  // A header longer than a row takes several: (4 + 200) ints are 816 bytes, 6.4 rows of 128.
  EXPECT_EQ((ExchangeShape{2, 4, 100, 64}).header_rows(), 7);
}

}  // namespace
}  // namespace moeserve::kernels
