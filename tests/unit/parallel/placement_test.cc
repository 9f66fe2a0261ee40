// ExpertPlacement: the default layout, the inverse tables (replicas, logcnt) against phy2log,
// the replica choice, validation of phy2log and of placement JSON (errors a user can act on, no
// crash), rank divisibility and versions.
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "engine/placement/expert_placement.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace moeserve::engine {
namespace {

using ::testing::ElementsAreArray;
using ::testing::HasSubstr;

// Checks replicas()/logcnt() against phy2log: expert e's replicas are exactly the slots that
// hold e, in increasing slot order.
void ExpectInverseMatchesPhy2Log(const ExpertPlacement& placement) {
  for (int layer = 0; layer < placement.num_layers(); ++layer) {
    const std::vector<int32_t>& phy2log = placement.phy2log(layer);
    ASSERT_EQ(static_cast<int>(phy2log.size()), placement.num_physical());
    int total = 0;
    for (int expert = 0; expert < placement.num_logical(); ++expert) {
      std::vector<int32_t> expected;
      for (int slot = 0; slot < placement.num_physical(); ++slot) {
        if (phy2log[slot] == expert) expected.push_back(slot);
      }
      auto replicas = placement.replicas(layer, expert);
      EXPECT_THAT(std::vector<int32_t>(replicas.begin(), replicas.end()),
                  ElementsAreArray(expected))
          << "layer " << layer << " expert " << expert;
      EXPECT_EQ(placement.logcnt(layer, expert), static_cast<int>(expected.size()));
      EXPECT_GE(placement.logcnt(layer, expert), 1);
      total += placement.logcnt(layer, expert);
    }
    EXPECT_EQ(total, placement.num_physical()) << "layer " << layer;
  }
}

// A valid random layout: every expert once, `extra` random replicas, slots shuffled.
std::vector<std::vector<int32_t>> RandomPhy2Log(int layers, int logical, int extra, uint32_t seed) {
  std::mt19937 random(seed);
  std::vector<std::vector<int32_t>> phy2log(layers);
  for (auto& layer : phy2log) {
    layer.resize(logical);
    std::iota(layer.begin(), layer.end(), 0);
    std::uniform_int_distribution<int32_t> expert(0, logical - 1);
    for (int i = 0; i < extra; ++i) layer.push_back(expert(random));
    std::shuffle(layer.begin(), layer.end(), random);
  }
  return phy2log;
}

TEST(ExpertPlacementTest, DefaultPutsExpertSlotModLogicalInEachSlot) {
  ExpertPlacement placement = ExpertPlacement::Default(3, 8, 12);
  EXPECT_EQ(placement.num_layers(), 3);
  EXPECT_EQ(placement.num_logical(), 8);
  EXPECT_EQ(placement.num_physical(), 12);
  EXPECT_EQ(placement.version(), 0);
  for (int layer = 0; layer < 3; ++layer) {
    EXPECT_THAT(placement.phy2log(layer), ElementsAreArray({0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3}));
    // Experts 0..3 have a second replica 8 slots later; 4..7 have one.
    for (int expert = 0; expert < 8; ++expert) {
      auto replicas = placement.replicas(layer, expert);
      if (expert < 4) {
        EXPECT_THAT(std::vector<int32_t>(replicas.begin(), replicas.end()),
                    ElementsAreArray({expert, expert + 8}));
      } else {
        EXPECT_THAT(std::vector<int32_t>(replicas.begin(), replicas.end()),
                    ElementsAreArray({expert}));
      }
    }
  }
  ExpectInverseMatchesPhy2Log(placement);
}

TEST(ExpertPlacementTest, DefaultWithoutRedundantExpertsIsTheIdentity) {
  ExpertPlacement placement = ExpertPlacement::Default(2, 64, 64);
  for (int layer = 0; layer < 2; ++layer) {
    for (int slot = 0; slot < 64; ++slot) EXPECT_EQ(placement.phy2log(layer)[slot], slot);
    for (int expert = 0; expert < 64; ++expert) EXPECT_EQ(placement.logcnt(layer, expert), 1);
  }
}

TEST(ExpertPlacementTest, DefaultWithMoreThanTwiceTheSlotsWrapsAgain) {
  ExpertPlacement placement = ExpertPlacement::Default(1, 3, 8);
  EXPECT_THAT(placement.phy2log(0), ElementsAreArray({0, 1, 2, 0, 1, 2, 0, 1}));
  EXPECT_EQ(placement.logcnt(0, 0), 3);
  EXPECT_EQ(placement.logcnt(0, 1), 3);
  EXPECT_EQ(placement.logcnt(0, 2), 2);
  ExpectInverseMatchesPhy2Log(placement);
}

TEST(ExpertPlacementTest, InverseTablesMatchRandomLayouts) {
  for (uint32_t seed = 0; seed < 20; ++seed) {
    auto phy2log = RandomPhy2Log(4, 16, static_cast<int>(seed % 9), seed);
    auto placement = ExpertPlacement::FromPhy2Log(phy2log, 16, 5);
    ASSERT_TRUE(placement.ok()) << placement.status();
    EXPECT_EQ(placement->version(), 5);
    EXPECT_EQ(placement->num_physical(), 16 + static_cast<int>(seed % 9));
    for (int layer = 0; layer < 4; ++layer) EXPECT_EQ(placement->phy2log(layer), phy2log[layer]);
    ExpectInverseMatchesPhy2Log(*placement);
  }
}

TEST(ExpertPlacementTest, ChooseSlotSpreadsKeysEvenlyOverAllReplicas) {
  // Expert 2 has four replicas, expert 1 has two, expert 0 one.
  auto placement = ExpertPlacement::FromPhy2Log({{2, 0, 2, 1, 2, 3, 1, 2}}, 4, 1);
  ASSERT_TRUE(placement.ok()) << placement.status();
  for (int expert = 0; expert < 4; ++expert) {
    std::set<int32_t> replicas;
    for (int32_t slot : placement->replicas(0, expert)) replicas.insert(slot);
    std::map<int32_t, int> chosen;
    const int count = static_cast<int>(replicas.size());
    const int keys = 120 * count;
    for (uint64_t key = 0; key < static_cast<uint64_t>(keys); ++key) {
      const int32_t slot = placement->ChooseSlot(0, expert, key);
      ASSERT_EQ(placement->phy2log(0)[slot], expert) << "slot " << slot << " key " << key;
      ++chosen[slot];
    }
    ASSERT_EQ(static_cast<int>(chosen.size()), count) << "expert " << expert;
    for (const auto& [slot, times] : chosen) {
      EXPECT_TRUE(replicas.count(slot));
      EXPECT_EQ(times, keys / count) << "expert " << expert << " slot " << slot;
    }
  }
  // Deterministic: the same key always picks the same slot, also across copies.
  ExpertPlacement copy = placement->WithVersion(9);
  for (uint64_t key = 0; key < 50; ++key) {
    EXPECT_EQ(placement->ChooseSlot(0, 2, key), copy.ChooseSlot(0, 2, key));
  }
  // Huge keys are fine.
  EXPECT_EQ(placement->phy2log(0)[placement->ChooseSlot(0, 2, ~uint64_t{0})], 2);
}

TEST(ExpertPlacementTest, FromPhy2LogRejectsExpertsOutOfRange) {
  auto too_big = ExpertPlacement::FromPhy2Log({{0, 1, 2, 4}}, 4, 1);
  EXPECT_EQ(too_big.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(too_big.status().message(), HasSubstr("expert 4"));
  auto negative = ExpertPlacement::FromPhy2Log({{0, 1, 2, 3}, {0, -1, 2, 3}}, 4, 1);
  EXPECT_EQ(negative.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(negative.status().message(), HasSubstr("layer 1"));
}

TEST(ExpertPlacementTest, FromPhy2LogRejectsAnExpertWithoutReplica) {
  auto missing = ExpertPlacement::FromPhy2Log({{0, 1, 2, 3}, {0, 1, 1, 3}}, 4, 1);
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(missing.status().message(), HasSubstr("expert 2"));
  EXPECT_THAT(missing.status().message(), HasSubstr("layer 1"));
}

TEST(ExpertPlacementTest, FromPhy2LogRejectsRaggedAndEmptyLayouts) {
  auto ragged = ExpertPlacement::FromPhy2Log({{0, 1, 2, 3}, {0, 1, 2, 3, 0}}, 4, 1);
  EXPECT_EQ(ragged.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(ragged.status().message(), HasSubstr("layer 1"));
  auto empty = ExpertPlacement::FromPhy2Log({}, 4, 1);
  EXPECT_EQ(empty.status().code(), absl::StatusCode::kInvalidArgument);
  // Fewer slots than experts: some expert has no replica.
  auto too_few = ExpertPlacement::FromPhy2Log({{0, 1, 2}}, 4, 1);
  EXPECT_EQ(too_few.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(ExpertPlacementTest, CreateIsTheOneValidationOfAPlacementFromOutside) {
  const PlacementShape shape{2, 3, 4, /*num_ranks=*/2};
  auto good = ExpertPlacement::Create({{0, 1, 2, 1}, {2, 2, 1, 0}}, 7, shape);
  ASSERT_TRUE(good.ok()) << good.status();
  EXPECT_EQ(good->version(), 7);
  EXPECT_TRUE(good->CheckShape(shape).ok());
  struct Case {
    std::vector<std::vector<int32_t>> phy2log;
    int64_t version;
    PlacementShape shape;
    std::string message;
  };
  const std::vector<Case> cases = {
      {{{0, 1, 2, 1}}, 1, shape, "1 layers given, the model has 2"},
      {{{0, 1, 2, 1}, {0, 1, 2}}, 1, shape, "layer 1 has 3 slots, expected 4"},
      {{{0, 1, 2, 1}, {0, 1, 2, 3}}, 1, shape, "holds expert 3"},
      {{{0, 1, 1, 1}, {0, 1, 2, 1}}, 1, shape, "no replica of expert 2"},
      {{{0, 1, 2, 1}, {0, 1, 2, 1}}, 1, {2, 3, 4, 3}, "do not divide over 3 ranks"},
      {{{0, 1, 2, 1}, {0, 1, 2, 1}}, -1, shape, "version -1 is out of range"},
      // A version no later update could exceed would block every update until a restart.
      {{{0, 1, 2, 1}, {0, 1, 2, 1}}, std::numeric_limits<int64_t>::max(), shape, "is out of range"},
  };
  for (const Case& c : cases) {
    auto placement = ExpertPlacement::Create(c.phy2log, c.version, c.shape);
    EXPECT_EQ(placement.status().code(), absl::StatusCode::kInvalidArgument) << c.message;
    EXPECT_THAT(placement.status().message(), HasSubstr(c.message));
  }
  EXPECT_EQ(good->CheckShape({2, 3, 5, 1}).code(), absl::StatusCode::kInvalidArgument);
}

TEST(ExpertPlacementTest, FromJsonReadsVersionAndLayout) {
  nlohmann::json json = {{"version", 42}, {"phy2log", {{1, 0, 2, 1}, {2, 2, 1, 0}}}};
  auto placement = ExpertPlacement::FromJson(json, {2, 3, 4});
  ASSERT_TRUE(placement.ok()) << placement.status();
  EXPECT_EQ(placement->version(), 42);
  EXPECT_THAT(placement->phy2log(0), ElementsAreArray({1, 0, 2, 1}));
  EXPECT_THAT(placement->phy2log(1), ElementsAreArray({2, 2, 1, 0}));
  ExpectInverseMatchesPhy2Log(*placement);
  // Without a version the placement is version 1 (newer than the default placement's 0).
  auto unversioned = ExpertPlacement::FromJson({{"phy2log", {{0, 1, 2}}}}, {1, 3, 3});
  ASSERT_TRUE(unversioned.ok()) << unversioned.status();
  EXPECT_EQ(unversioned->version(), 1);
}

TEST(ExpertPlacementTest, FromJsonRejectsTheWrongLayerCount) {
  nlohmann::json json = {{"version", 2}, {"phy2log", {{0, 1, 2, 3}}}};
  auto placement = ExpertPlacement::FromJson(json, {2, 4, 4});
  EXPECT_EQ(placement.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(placement.status().message(), HasSubstr("1 layers given"));
  EXPECT_THAT(placement.status().message(), HasSubstr("2 MoE layers"));
}

TEST(ExpertPlacementTest, FromJsonRejectsTheWrongSlotCount) {
  nlohmann::json json = {{"version", 2}, {"phy2log", {{0, 1, 2, 3}, {0, 1, 2, 3, 0}}}};
  auto placement = ExpertPlacement::FromJson(json, {2, 4, 5});
  EXPECT_EQ(placement.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(placement.status().message(), HasSubstr("layer 0 has 4 slots, expected 5"));
}

TEST(ExpertPlacementTest, FromJsonRejectsMalformedDocuments) {
  const std::vector<nlohmann::json> malformed = {
      nlohmann::json::object(),                             // no phy2log
      nlohmann::json::array({0, 1, 2, 3}),                  // not an object
      nlohmann::json("phy2log"),                            // a string
      nlohmann::json(nullptr),                              // null
      {{"phy2log", "0 1 2 3"}},                             // not a list
      {{"phy2log", {0, 1, 2, 3}}},                          // not nested
      {{"phy2log", {{"a", "b", "c", "d"}}}},                // not numbers
      {{"phy2log", {{0, 1, nullptr, 3}}}},                  // a null slot
      {{"phy2log", {{0, 1, 2, 3}}}, {"version", "seven"}},  // version not a number
  };
  for (const auto& json : malformed) {
    auto placement = ExpertPlacement::FromJson(json, {1, 4, 4});
    EXPECT_EQ(placement.status().code(), absl::StatusCode::kInvalidArgument) << json.dump();
    EXPECT_THAT(placement.status().message(), HasSubstr("phy2log")) << json.dump();
  }
}

TEST(ExpertPlacementTest, FromJsonRejectsExpertIdsThatAreNotSmallIntegers) {
  // Regression: ExpertPlacement::FromJson accepted slot values that are not experts. nlohmann's
  // get<std::vector<std::vector<int32_t>>>() static_casts each number, so 4294967297 (2^32 + 1)
  // became expert 1 and 2.7 became expert 2; a corrupt placement file must be rejected.
  const std::vector<nlohmann::json> invalid = {
      {{"phy2log", {{0, 4294967297LL, 2, 3}}}},
      {{"phy2log", {{0, 1, 2.7, 3}}}},
  };
  for (const auto& json : invalid) {
    auto placement = ExpertPlacement::FromJson(json, {1, 4, 4});
    EXPECT_EQ(placement.status().code(), absl::StatusCode::kInvalidArgument) << json.dump();
  }
}

TEST(ExpertPlacementTest, LoadJsonFileReadsAFileAndReportsBadOnes) {
  const auto dir = std::filesystem::path(::testing::TempDir()) /
                   ("parallel_placement_test." + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const auto good = dir / "good.json";
  std::ofstream(good) << R"({"version": 3, "phy2log": [[1, 0, 1], [0, 1, 0]]})";
  auto placement = ExpertPlacement::LoadJsonFile(good.string(), {2, 2, 3});
  ASSERT_TRUE(placement.ok()) << placement.status();
  EXPECT_EQ(placement->version(), 3);
  EXPECT_THAT(placement->phy2log(1), ElementsAreArray({0, 1, 0}));

  const auto bad = dir / "bad.json";
  std::ofstream(bad) << R"({"version": 3, "phy2log": [[1, 0, 1], [0, 1,)";
  auto truncated = ExpertPlacement::LoadJsonFile(bad.string(), {2, 2, 3});
  EXPECT_EQ(truncated.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(truncated.status().message(), HasSubstr("bad.json"));

  auto missing = ExpertPlacement::LoadJsonFile((dir / "missing.json").string(), {2, 2, 3});
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  // Shape is checked against the model for files as well.
  auto wrong_shape = ExpertPlacement::LoadJsonFile(good.string(), {2, 2, 4});
  EXPECT_EQ(wrong_shape.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(ExpertPlacementTest, CheckRanksRequiresSlotsToDivideOverRanks) {
  ExpertPlacement placement = ExpertPlacement::Default(3, 64, 72);
  for (int ranks : {1, 2, 3, 4, 6, 8, 9, 12, 18, 24, 36, 72}) {
    EXPECT_TRUE(placement.CheckRanks(ranks).ok()) << ranks;
  }
  for (int ranks : {5, 7, 10, 16, 64, 73, 144}) {
    absl::Status status = placement.CheckRanks(ranks);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << ranks;
    EXPECT_THAT(status.message(), HasSubstr("72")) << ranks;
  }
  EXPECT_EQ(placement.CheckRanks(0).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(placement.CheckRanks(-8).code(), absl::StatusCode::kInvalidArgument);
}

TEST(ExpertPlacementTest, WithVersionCopiesTheLayoutAndLeavesTheOriginal) {
  auto original = ExpertPlacement::FromPhy2Log(RandomPhy2Log(2, 8, 4, 7), 8, 3);
  ASSERT_TRUE(original.ok());
  ExpertPlacement newer = original->WithVersion(11);
  EXPECT_EQ(newer.version(), 11);
  EXPECT_EQ(original->version(), 3);
  EXPECT_EQ(newer.num_layers(), 2);
  EXPECT_EQ(newer.num_logical(), 8);
  EXPECT_EQ(newer.num_physical(), 12);
  for (int layer = 0; layer < 2; ++layer) EXPECT_EQ(newer.phy2log(layer), original->phy2log(layer));
  ExpectInverseMatchesPhy2Log(newer);
}

}  // namespace
}  // namespace moeserve::engine
