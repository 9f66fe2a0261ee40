// The device-planned MoE of a decode step (kernels/device_moe.h) against its CPU twins: the plan
// slot for slot, the tensor-core grouped GEMM in bf16 and FP8, and the whole chain (plan, both
// projections, the weighted sum) against the twins' chain. Skipped where no GPU is present.
//
// Tolerances: the GPU and the twins both accumulate in fp32 and round to bf16; the sums run in
// a different order, so a result may differ in its last bf16 bit (2^-8 of its value) — max
// |diff| / max |ref| < 1e-2 for one projection, < 2e-2 after SiLU and a second projection (a
// changed bf16 activation feeds 128..2048-long sums), as for ExpertMlp.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cpu_twins.h"
#include "kernels/device_moe.h"
#include "kernels/fp8.h"
#include "kernels/fp8_twins.h"
#include "kernels/kernels.h"
#include "tests/gpu/device_copies.h"

namespace moeserve::kernels {
namespace {

using testing::DeviceMemory;
using testing::RandomBf16;
using testing::RelativeError;
using testing::ToHost;

__nv_bfloat16* Bf(uint16_t* p) { return reinterpret_cast<__nv_bfloat16*>(p); }

// top_k distinct experts per token; with `hot` >= 0 every token also picks that expert.
std::vector<int32_t> RandomRouting(int tokens, int top_k, int experts, int hot, unsigned seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> routed;
  std::vector<int32_t> all(experts);
  for (int t = 0; t < tokens; ++t) {
    std::iota(all.begin(), all.end(), 0);
    std::shuffle(all.begin(), all.end(), rng);
    if (hot >= 0) std::swap(all[0], *std::find(all.begin(), all.end(), hot));
    routed.insert(routed.end(), all.begin(), all.begin() + top_k);
  }
  return routed;
}

// Replicas as ExpertPlacement::Default lays them out: slot s holds expert s % experts.
struct ReplicaTable {
  std::vector<int32_t> begin, slots;
  ReplicaTable(int experts, int total_slots) : begin(experts + 1, 0) {
    for (int e = 0; e < experts; ++e) {
      for (int s = e; s < total_slots; s += experts) slots.push_back(s);
      begin[e + 1] = static_cast<int32_t>(slots.size());
    }
  }
};

struct HostPlan {
  std::vector<int32_t> offsets, source_rows, positions, load;
};

HostPlan TwinPlan(const std::vector<int32_t>& routed, int tokens, int top_k,
                  const ReplicaTable& table, int slots) {
  HostPlan plan{std::vector<int32_t>(slots + 1), std::vector<int32_t>(routed.size()),
                std::vector<int32_t>(routed.size()), std::vector<int32_t>(slots, 0)};
  PlanSlotsTwin(routed.data(), tokens, top_k, table.begin.data(), table.slots.data(), slots,
                plan.offsets.data(), plan.source_rows.data(), plan.positions.data(),
                plan.load.data());
  return plan;
}

// The plan on the GPU, read back (load counts added to `load_before`).
HostPlan GpuPlan(DeviceMemory& memory, const std::vector<int32_t>& routed, int tokens, int top_k,
                 const ReplicaTable& table, int experts, int slots, int32_t load_before) {
  int32_t* offsets = memory.Allocate<int32_t>(slots + 1);
  int32_t* source_rows = memory.Allocate<int32_t>(routed.size());
  int32_t* positions = memory.Allocate<int32_t>(routed.size());
  int32_t* load = memory.Upload(std::vector<int32_t>(slots, load_before));
  const DeviceReplicaTable device_table{memory.Upload(table.begin), memory.Upload(table.slots),
                                        experts};
  EXPECT_TRUE(PlanSlots(memory.Upload(routed), tokens, top_k, device_table, slots, offsets,
                        source_rows, positions, load, nullptr)
                  .ok());
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  return {ToHost(offsets, slots + 1), ToHost(source_rows, routed.size()),
          ToHost(positions, routed.size()), ToHost(load, slots)};
}

TEST(DeviceMoe, PlanSlotsMatchesItsTwin) {
  REQUIRE_GPU();
  const int experts = 256, slots = 288, top_k = 8;
  const ReplicaTable table(experts, slots);
  struct Case {
    int tokens;
    int hot;
  };
  for (const Case c :
       {Case{0, -1}, Case{1, -1}, Case{8, -1}, Case{64, -1}, Case{300, 5}, Case{1024, -1}}) {
    SCOPED_TRACE(::testing::Message() << c.tokens << " tokens, hot expert " << c.hot);
    const auto routed = RandomRouting(c.tokens, top_k, experts, c.hot, 7 + c.tokens);
    const HostPlan twin = TwinPlan(routed, c.tokens, top_k, table, slots);
    DeviceMemory memory;
    const HostPlan gpu = GpuPlan(memory, routed, c.tokens, top_k, table, experts, slots, 3);
    EXPECT_EQ(gpu.offsets, twin.offsets);
    for (int s = 0; s < slots; ++s) ASSERT_EQ(gpu.load[s], 3 + twin.load[s]) << "slot " << s;
    // Inside a slot the GPU's order may differ: each pair's row must lie in the twin's slot of
    // that pair, hold the pair's token, and no two pairs may share a row.
    std::vector<bool> taken(routed.size(), false);
    for (size_t p = 0; p < routed.size(); ++p) {
      const int slot = static_cast<int>(
          std::upper_bound(twin.offsets.begin(), twin.offsets.end(), twin.positions[p]) -
          twin.offsets.begin() - 1);
      const int row = gpu.positions[p];
      ASSERT_GE(row, twin.offsets[slot]) << "pair " << p;
      ASSERT_LT(row, twin.offsets[slot + 1]) << "pair " << p;
      ASSERT_FALSE(taken[row]) << "pair " << p;
      taken[row] = true;
      EXPECT_EQ(gpu.source_rows[row], static_cast<int>(p) / top_k);
    }
  }
}

// Rows per slot: none, one, a partial pass, exactly one pass, a pass and one, several passes.
const std::vector<int> kSlotRows = {0, 1, 3, 16, 17, 40};

// The grouped rows of kSlotRows, each reading a random row of x (of `x_rows`).
struct Grouping {
  std::vector<int32_t> offsets{0};
  std::vector<int32_t> source_rows;
  std::vector<int64_t> offsets64{0};
};
Grouping MakeGrouping(const std::vector<int>& slot_rows, int x_rows, unsigned seed) {
  std::mt19937 rng(seed);
  Grouping g;
  for (int rows : slot_rows) {
    for (int r = 0; r < rows; ++r) g.source_rows.push_back(static_cast<int32_t>(rng() % x_rows));
    g.offsets.push_back(g.offsets.back() + rows);
    g.offsets64.push_back(g.offsets.back());
  }
  return g;
}

std::vector<uint16_t> Gather(const std::vector<uint16_t>& x, const std::vector<int32_t>& rows,
                             int k) {
  std::vector<uint16_t> out(rows.size() * static_cast<size_t>(k));
  for (size_t r = 0; r < rows.size(); ++r) {
    std::copy_n(x.begin() + static_cast<size_t>(rows[r]) * k, k, out.begin() + r * k);
  }
  return out;
}

struct GemmShape {
  int n, k;
};

// DeviceGroupedGemm over grouping `g` of x's rows against the twins' `expected`: with a block
// per slot, and with blocks only for the busy slots (each finds its slot).
void ExpectGemmMatches(DeviceMemory& memory, const std::vector<uint16_t>& x, const Grouping& g,
                       const DeviceSlotWeights& weights, GemmShape shape,
                       const std::vector<uint16_t>& expected) {
  int busy = 0;
  for (size_t s = 0; s + 1 < g.offsets.size(); ++s) busy += g.offsets[s + 1] > g.offsets[s];
  for (const int bound : {-1, busy}) {
    SCOPED_TRACE(::testing::Message() << "busy slot bound " << bound);
    uint16_t* y = memory.Allocate<uint16_t>(expected.size());
    const DeviceSlotPlan plan{memory.Upload(g.offsets), memory.Upload(g.source_rows),
                              static_cast<int>(g.offsets.size()) - 1, bound};
    ASSERT_TRUE(
        DeviceGroupedGemm(Bf(memory.Upload(x)), plan, weights, shape.n, shape.k, Bf(y), nullptr)
            .ok());
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_LT(RelativeError(ToHost(y, expected.size()), expected), 1e-2);
  }
}

TEST(DeviceMoe, GroupedGemmMatchesTwinInBf16) {
  REQUIRE_GPU();
  // A partial column block (264 = 2 x 128 + 8), and DeepSeek-V3's gate/up width.
  for (const GemmShape shape : {GemmShape{264, 384}, GemmShape{4096, 7168}}) {
    SCOPED_TRACE(::testing::Message() << "n " << shape.n << ", k " << shape.k);
    const std::vector<int> slot_rows =
        shape.n > 1000 ? std::vector<int>{1, 0, 5} : kSlotRows;  // keeps the twin quick
    const int x_rows = 50;
    const Grouping g = MakeGrouping(slot_rows, x_rows, 5);
    const auto x = RandomBf16(static_cast<size_t>(x_rows) * shape.k, 1);
    DeviceMemory memory;
    std::vector<std::vector<uint16_t>> weights;
    std::vector<const uint16_t*> host_weights;
    std::vector<const __nv_bfloat16*> device_weights;
    for (size_t s = 0; s < slot_rows.size(); ++s) {
      weights.push_back(RandomBf16(static_cast<size_t>(shape.n) * shape.k, 30 + s, 0.05f));
      host_weights.push_back(weights.back().data());
      device_weights.push_back(Bf(memory.Upload(weights.back())));
    }
    std::vector<uint16_t> expected(g.source_rows.size() * shape.n);
    GroupedLinearTwin(Gather(x, g.source_rows, shape.k).data(), host_weights, g.offsets64,
                      expected.data(), shape.n, shape.k);
    ExpectGemmMatches(memory, x, g, {.bf16 = memory.Upload(device_weights)}, shape, expected);
  }
}

TEST(DeviceMoe, GroupedGemmMatchesWeightOnlyTwinInFp8) {
  REQUIRE_GPU();
  for (const GemmShape shape : {GemmShape{264, 384}, GemmShape{7168, 2048}}) {
    SCOPED_TRACE(::testing::Message() << "n " << shape.n << ", k " << shape.k);
    const std::vector<int> slot_rows = shape.n > 1000 ? std::vector<int>{2, 0, 4} : kSlotRows;
    const int x_rows = 50;
    const Grouping g = MakeGrouping(slot_rows, x_rows, 9);
    const auto x = RandomBf16(static_cast<size_t>(x_rows) * shape.k, 2);
    const auto gathered = Gather(x, g.source_rows, shape.k);
    DeviceMemory memory;
    std::vector<Fp8Weight> device_weights;
    std::vector<uint16_t> expected(g.source_rows.size() * shape.n);
    for (size_t s = 0; s < slot_rows.size(); ++s) {
      const auto bf16 = RandomBf16(static_cast<size_t>(shape.n) * shape.k, 60 + s, 0.05f);
      std::vector<uint8_t> values(bf16.size());
      std::vector<float> scales(WeightScaleCount(shape.n, shape.k));
      QuantizeWeightBlocksFp8Twin(bf16.data(), shape.n, shape.k, values.data(), scales.data());
      Fp8WeightOnlyGemmTwin(gathered.data() + static_cast<size_t>(g.offsets[s]) * shape.k,
                            slot_rows[s], {values.data(), scales.data()}, shape.n, shape.k,
                            expected.data() + static_cast<size_t>(g.offsets[s]) * shape.n);
      device_weights.push_back(
          {reinterpret_cast<const __nv_fp8_e4m3*>(memory.Upload(values)), memory.Upload(scales)});
    }
    ExpectGemmMatches(memory, x, g, {.fp8 = memory.Upload(device_weights)}, shape, expected);
  }
}

// A row's result is the same bits whether it is alone in its slot or shares it with 30 others
// at any place, in bf16 and in FP8: what makes logits independent of the batch's routing and of
// the EP layout.
TEST(DeviceMoe, ARowsResultDoesNotDependOnItsSlotMates) {
  REQUIRE_GPU();
  const int n = 256, k = 512, x_rows = 31;
  DeviceMemory memory;
  const auto x = RandomBf16(static_cast<size_t>(x_rows) * k, 4);
  const __nv_bfloat16* dx = Bf(memory.Upload(x));
  const auto weight = RandomBf16(static_cast<size_t>(n) * k, 8, 0.05f);
  std::vector<uint8_t> values(weight.size());
  std::vector<float> scales(WeightScaleCount(n, k));
  QuantizeWeightBlocksFp8Twin(weight.data(), n, k, values.data(), scales.data());
  const DeviceSlotWeights bf16{
      .bf16 = memory.Upload(std::vector<const __nv_bfloat16*>{Bf(memory.Upload(weight))})};
  const DeviceSlotWeights fp8{
      .fp8 = memory.Upload(std::vector<Fp8Weight>{
          {reinterpret_cast<const __nv_fp8_e4m3*>(memory.Upload(values)), memory.Upload(scales)}})};
  for (const DeviceSlotWeights& w : {bf16, fp8}) {
    SCOPED_TRACE(w.bf16 != nullptr ? "bf16" : "FP8");
    auto run = [&](const std::vector<int32_t>& source_rows) {
      uint16_t* y = memory.Allocate<uint16_t>(source_rows.size() * n);
      const std::vector<int32_t> offsets = {0, static_cast<int32_t>(source_rows.size())};
      const DeviceSlotPlan plan{memory.Upload(offsets), memory.Upload(source_rows), 1};
      EXPECT_TRUE(DeviceGroupedGemm(dx, plan, w, n, k, Bf(y), nullptr).ok());
      EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      return ToHost(y, source_rows.size() * n);
    };
    std::vector<int32_t> all(x_rows);
    std::iota(all.rbegin(), all.rend(), 0);  // row 30 first, row 0 last
    const auto together = run(all);
    for (int row : {0, 7, 30}) {
      const auto alone = run({row});
      const size_t at = static_cast<size_t>(x_rows - 1 - row) * n;
      EXPECT_EQ(0, std::memcmp(alone.data(), together.data() + at, n * sizeof(uint16_t)))
          << "row " << row;
    }
  }
}

// Routing -> plan -> gate/up, SiLU, down -> weighted sum, all on the device, against the twins'
// chain; with redundant replicas and a hot expert.
TEST(DeviceMoe, ExpertMlpChainMatchesTwins) {
  REQUIRE_GPU();
  const int hidden = 256, inter = 128, experts = 12, slots = 16, top_k = 3, tokens = 21;
  const ReplicaTable table(experts, slots);
  const auto routed = RandomRouting(tokens, top_k, experts, /*hot=*/2, 13);
  std::vector<float> routing_weights(routed.size());
  std::mt19937 rng(3);
  for (float& v : routing_weights) v = std::uniform_real_distribution<float>(0.1f, 1.0f)(rng);
  const auto x = RandomBf16(static_cast<size_t>(tokens) * hidden, 21);
  DeviceMemory memory;
  std::vector<std::vector<uint16_t>> gate_up, down;
  std::vector<const uint16_t*> gate_up_host, down_host;
  std::vector<const __nv_bfloat16*> gate_up_device, down_device;
  for (int s = 0; s < slots; ++s) {
    const int e = s % experts;  // a replica holds its expert's weights
    gate_up.push_back(RandomBf16(static_cast<size_t>(2) * inter * hidden, 100 + e, 0.06f));
    down.push_back(RandomBf16(static_cast<size_t>(hidden) * inter, 200 + e, 0.09f));
    gate_up_host.push_back(gate_up.back().data());
    down_host.push_back(down.back().data());
    gate_up_device.push_back(Bf(memory.Upload(gate_up.back())));
    down_device.push_back(Bf(memory.Upload(down.back())));
  }
  // The twins' chain.
  const HostPlan plan = TwinPlan(routed, tokens, top_k, table, slots);
  const int rows = static_cast<int>(routed.size());
  std::vector<int64_t> offsets64(plan.offsets.begin(), plan.offsets.end());
  std::vector<uint16_t> h(static_cast<size_t>(rows) * 2 * inter),
      a(static_cast<size_t>(rows) * inter), expert_out(static_cast<size_t>(rows) * hidden),
      expected(static_cast<size_t>(tokens) * hidden);
  GroupedLinearTwin(Gather(x, plan.source_rows, hidden).data(), gate_up_host, offsets64, h.data(),
                    2 * inter, hidden);
  SiluMulTwin(h.data(), a.data(), rows, inter);
  GroupedLinearTwin(a.data(), down_host, offsets64, expert_out.data(), hidden, inter);
  WeightedUnpermuteTwin(expert_out.data(), plan.positions.data(), routing_weights.data(), nullptr,
                        expected.data(), tokens, top_k, hidden);
  // The device's.
  int32_t* d_offsets = memory.Allocate<int32_t>(slots + 1);
  int32_t* d_source = memory.Allocate<int32_t>(rows);
  int32_t* d_positions = memory.Allocate<int32_t>(rows);
  const DeviceReplicaTable d_table{memory.Upload(table.begin), memory.Upload(table.slots), experts};
  ASSERT_TRUE(PlanSlots(memory.Upload(routed), tokens, top_k, d_table, slots, d_offsets, d_source,
                        d_positions, /*load=*/nullptr, nullptr)
                  .ok());
  auto mlp = DeviceExpertMlp::Create(hidden, inter, rows, nullptr);
  ASSERT_TRUE(mlp.ok()) << mlp.status();
  uint16_t* d_expert_out = memory.Allocate<uint16_t>(expert_out.size());
  ASSERT_TRUE(mlp->Run(Bf(memory.Upload(x)), {d_offsets, d_source, slots}, rows,
                       {.bf16 = memory.Upload(gate_up_device)},
                       {.bf16 = memory.Upload(down_device)}, Bf(d_expert_out))
                  .ok());
  uint16_t* d_out = memory.Allocate<uint16_t>(expected.size());
  ASSERT_TRUE(WeightedUnpermute(Bf(d_expert_out), d_positions, memory.Upload(routing_weights),
                                nullptr, Bf(d_out), tokens, top_k, hidden, nullptr)
                  .ok());
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_LT(RelativeError(ToHost(d_out, expected.size()), expected), 2e-2);
}

TEST(DeviceMoe, RejectsShapesItCannotRun) {
  const DeviceSlotPlan plan{nullptr, nullptr, 1};
  const DeviceSlotWeights none{};
  EXPECT_FALSE(DeviceGroupedGemm(nullptr, plan, none, 256, 256, nullptr, nullptr).ok());
  const __nv_bfloat16* const* some = reinterpret_cast<const __nv_bfloat16* const*>(&plan);
  EXPECT_FALSE(DeviceGroupedGemm(nullptr, plan, {.bf16 = some}, 256, 100, nullptr, nullptr).ok());
  EXPECT_FALSE(DeviceGroupedGemm(nullptr, plan, {.bf16 = some}, 250, 256, nullptr, nullptr).ok());
  EXPECT_FALSE(DeviceExpertMlp::Create(200, 128, 8, nullptr).ok());
  const DeviceReplicaTable table{nullptr, nullptr, 4};
  EXPECT_FALSE(
      PlanSlots(nullptr, kMaxPlannedPairs, 2, table, 8, nullptr, nullptr, nullptr, nullptr, nullptr)
          .ok());
  EXPECT_FALSE(PlanSlots(nullptr, 1, 1, table, kMaxPlannedSlots + 1, nullptr, nullptr, nullptr,
                         nullptr, nullptr)
                   .ok());
}

}  // namespace
}  // namespace moeserve::kernels
