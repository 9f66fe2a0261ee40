// The device-planned exchange's kernels (kernels/device_exchange.h) against their CPU twins: the
// sender's plan header for header and row for row (both keep token order), the receiver's
// grouping slot for slot (its order inside a slot may differ), overflows flagged on both sides,
// and GatherRows leaving rows without a source alone. Skipped where no GPU is present.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <numeric>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cpu_twins.h"
#include "kernels/device_exchange.h"
#include "kernels/kernels.h"
#include "tests/gpu/device_copies.h"

namespace moeserve::kernels {
namespace {

using testing::DeviceMemory;
using testing::ToHost;

// DeepSeek-V3's routing over 8 GPUs: 256 experts in 288 slots (the first 32 twice), top-8.
constexpr int kExperts = 256, kSlots = 288, kRanks = 8, kTopK = 8, kHidden = 64;
constexpr int kSlotsPerRank = kSlots / kRanks;

std::vector<int32_t> RandomRouting(int tokens, unsigned seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> routed, all(kExperts);
  for (int t = 0; t < tokens; ++t) {
    std::iota(all.begin(), all.end(), 0);
    std::shuffle(all.begin(), all.end(), rng);
    routed.insert(routed.end(), all.begin(), all.begin() + kTopK);
  }
  return routed;
}

struct Replicas {
  std::vector<int32_t> begin = std::vector<int32_t>(kExperts + 1, 0), slots;
  Replicas() {
    for (int e = 0; e < kExperts; ++e) {
      for (int s = e; s < kSlots; s += kExperts) slots.push_back(s);
      begin[e + 1] = static_cast<int32_t>(slots.size());
    }
  }
};

struct SenderPlan {
  std::vector<uint16_t> dispatch;
  std::vector<int32_t> index, positions;
};

SenderPlan TwinSend(const std::vector<int32_t>& routed, int tokens, int rank,
                    const ExchangeShape& shape, const Replicas& replicas) {
  SenderPlan plan{std::vector<uint16_t>(shape.dispatch_rows() * shape.hidden, 0),
                  std::vector<int32_t>(shape.dispatch_rows()), std::vector<int32_t>(routed.size())};
  PlanDestinationsTwin(routed.data(), tokens, kTopK, replicas.begin.data(), replicas.slots.data(),
                       kSlotsPerRank, rank, shape, plan.dispatch.data(), plan.index.data(),
                       plan.positions.data());
  return plan;
}

const int32_t* Header(const std::vector<uint16_t>& buffer, const ExchangeShape& shape, int p) {
  return reinterpret_cast<const int32_t*>(buffer.data() + shape.BlockOffset(p));
}

TEST(DeviceExchange, PlanDestinationsMatchesItsTwin) {
  REQUIRE_GPU();
  const Replicas replicas;
  struct Case {
    int tokens, rows, entries;
  };
  // Ample capacities, then ones that 300 tokens overflow (more than a block of threads apart).
  for (const Case c : {Case{0, 4, 8}, Case{1, 1, 8}, Case{8, 8, 64}, Case{64, 64, 128},
                       Case{300, 300, 600}, Case{300, 100, 200}}) {
    SCOPED_TRACE(::testing::Message() << c.tokens << " tokens, capacity " << c.rows << " rows, "
                                      << c.entries << " entries");
    const ExchangeShape shape{kRanks, c.rows, c.entries, kHidden};
    const int rank = 3;
    const auto routed = RandomRouting(c.tokens, 17 + c.tokens);
    const SenderPlan twin = TwinSend(routed, c.tokens, rank, shape, replicas);

    DeviceMemory memory;
    const DeviceReplicaTable table{memory.Upload(replicas.begin), memory.Upload(replicas.slots),
                                   kExperts};
    auto* dispatch = memory.Allocate<__nv_bfloat16>(shape.dispatch_rows() * shape.hidden);
    int32_t* index = memory.Allocate<int32_t>(shape.dispatch_rows());
    int32_t* positions = memory.Allocate<int32_t>(std::max<size_t>(routed.size(), 1));
    int32_t* peer_overflow = memory.Allocate<int32_t>(kRanks);
    ASSERT_TRUE(PlanDestinations(routed.empty() ? nullptr : memory.Upload(routed), c.tokens, kTopK,
                                 table, kSlotsPerRank, rank, shape, dispatch, index, positions,
                                 peer_overflow, nullptr)
                    .ok());
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const auto* raw = reinterpret_cast<const uint16_t*>(dispatch);
    const std::vector<uint16_t> gpu_dispatch = ToHost(raw, shape.dispatch_rows() * shape.hidden);
    EXPECT_EQ(ToHost(index, shape.dispatch_rows()), twin.index);
    EXPECT_EQ(ToHost(positions, routed.size()), twin.positions);
    bool overflowed = false;
    for (int p = 0; p < kRanks; ++p) {
      const int32_t* gpu = Header(gpu_dispatch, shape, p);
      const int32_t* expected = Header(twin.dispatch, shape, p);
      for (int i = 0; i < ExchangeShape::kHeaderInts; ++i) {
        EXPECT_EQ(gpu[i], expected[i]) << "destination " << p << " header int " << i;
      }
      overflowed |= expected[2] != 0;
      const int sent = std::min(expected[1], shape.entries);
      for (int i = ExchangeShape::kHeaderInts; i < ExchangeShape::kHeaderInts + 2 * sent; ++i) {
        // Entries past a row capacity are not written by either.
        if (expected[i] == 0 && gpu[i] == -1) continue;
        EXPECT_EQ(gpu[i], expected[i]) << "destination " << p << " header int " << i;
      }
    }
    EXPECT_EQ(overflowed, c.tokens == 300 && c.rows == 100) << "only the small capacity overflows";
  }
}

// Four senders' twin plans, exchanged on the host, then grouped by the receiver's kernel.
TEST(DeviceExchange, PlanReceivedMatchesItsTwin) {
  REQUIRE_GPU();
  const Replicas replicas;
  const std::vector<int> tokens = {5, 0, 64, 33, 1, 17, 64, 2};
  for (const int entries : {160, 40}) {  // then too few for rank 2's and rank 6's 64 tokens
    SCOPED_TRACE(::testing::Message() << entries << " entries per destination");
    const ExchangeShape shape{kRanks, 64, entries, kHidden};
    std::vector<SenderPlan> sent;
    for (int r = 0; r < kRanks; ++r) {
      sent.push_back(TwinSend(RandomRouting(tokens[r], 40 + r), tokens[r], r, shape, replicas));
    }
    const int receiver = 5;
    const int64_t block = shape.BlockOffset(1);
    std::vector<uint16_t> received(shape.dispatch_rows() * shape.hidden);
    for (int r = 0; r < kRanks; ++r) {
      std::copy_n(sent[r].dispatch.begin() + receiver * block, block, received.begin() + r * block);
    }
    const int64_t pairs = shape.combine_rows();
    std::vector<int32_t> offsets(kSlotsPerRank + 1), source(pairs), grouped(pairs),
        load(kSlotsPerRank, 2);
    int32_t overflow = 0;
    PlanReceivedTwin(received.data(), shape, kSlotsPerRank, offsets.data(), source.data(),
                     grouped.data(), load.data(), &overflow);

    DeviceMemory memory;
    int32_t* d_offsets = memory.Allocate<int32_t>(kSlotsPerRank + 1);
    int32_t* d_source = memory.Allocate<int32_t>(pairs);
    int32_t* d_grouped = memory.Allocate<int32_t>(pairs);
    int32_t* d_load = memory.Upload(std::vector<int32_t>(kSlotsPerRank, 2));
    int32_t* d_overflow = memory.Upload(std::vector<int32_t>{0});
    ASSERT_TRUE(PlanReceived(reinterpret_cast<const __nv_bfloat16*>(memory.Upload(received)), shape,
                             kSlotsPerRank, d_offsets, d_source, d_grouped, d_load, d_overflow,
                             nullptr)
                    .ok());
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(ToHost(d_offsets, kSlotsPerRank + 1), offsets);
    EXPECT_EQ(ToHost(d_load, kSlotsPerRank), load);
    EXPECT_EQ(ToHost(d_overflow, 1)[0], overflow);
    EXPECT_EQ(overflow, entries == 40 ? 1 : 0);
    const std::vector<int32_t> gpu_grouped = ToHost(d_grouped, pairs);
    const std::vector<int32_t> gpu_source = ToHost(d_source, pairs);
    std::vector<bool> taken(pairs, false);
    for (int64_t q = 0; q < pairs; ++q) {
      if (grouped[q] < 0) {
        EXPECT_EQ(gpu_grouped[q], -1) << "entry " << q;
        continue;
      }
      // The twin's slot of this entry; the GPU's row must lie in it and read the same row.
      const int slot = static_cast<int>(
          std::upper_bound(offsets.begin(), offsets.end(), grouped[q]) - offsets.begin() - 1);
      const int row = gpu_grouped[q];
      ASSERT_GE(row, offsets[slot]) << "entry " << q;
      ASSERT_LT(row, offsets[slot + 1]) << "entry " << q;
      ASSERT_FALSE(taken[row]) << "entry " << q;
      taken[row] = true;
      EXPECT_EQ(gpu_source[row], source[grouped[q]]) << "entry " << q;
    }
  }
}

TEST(DeviceExchange, GatherRowsLeavesRowsWithoutASourceAlone) {
  REQUIRE_GPU();
  const int hidden = 24, rows = 5;
  std::vector<uint16_t> x(3 * hidden), before(rows * hidden, 7);
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<uint16_t>(100 + i);
  const std::vector<int32_t> index = {2, -1, 0, -1, 2};
  DeviceMemory memory;
  auto* out = reinterpret_cast<__nv_bfloat16*>(memory.Upload(before));
  ASSERT_TRUE(GatherRows(reinterpret_cast<const __nv_bfloat16*>(memory.Upload(x)),
                         memory.Upload(index), out, rows, hidden, nullptr)
                  .ok());
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<uint16_t> got = ToHost(reinterpret_cast<const uint16_t*>(out), rows * hidden);
  for (int r = 0; r < rows; ++r) {
    for (int i = 0; i < hidden; ++i) {
      const uint16_t expected = index[r] < 0 ? 7 : x[index[r] * hidden + i];
      ASSERT_EQ(got[r * hidden + i], expected) << "row " << r << " value " << i;
    }
  }
}

TEST(DeviceExchange, RejectsShapesItCannotRun) {
  REQUIRE_GPU();
  const DeviceReplicaTable table{nullptr, nullptr, kExperts};
  EXPECT_FALSE(PlanDestinations(nullptr, 1, kTopK, table, kSlotsPerRank, /*rank=*/8,
                                {kRanks, 4, 4, kHidden}, nullptr, nullptr, nullptr, nullptr,
                                nullptr)
                   .ok());
  EXPECT_FALSE(PlanReceived(nullptr, {kRanks, 4, kMaxPlannedPairs, kHidden}, kSlotsPerRank, nullptr,
                            nullptr, nullptr, nullptr, nullptr, nullptr)
                   .ok());
  EXPECT_FALSE(PlanReceived(nullptr, {kRanks, 4, 4, 12}, kSlotsPerRank, nullptr, nullptr, nullptr,
                            nullptr, nullptr, nullptr)
                   .ok());
}

}  // namespace
}  // namespace moeserve::kernels
