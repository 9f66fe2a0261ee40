// ExpertParallelGroup: the per-step agreement (work, token maximum, split, stop) and live
// placement updates — a newer version commits while ranks step, every rank switches at the
// same agreement, stale versions and wrong shapes are refused, and outputs do not change across
// the switch. The tests drive the rank threads themselves.
#include "engine/parallel/ep_group.h"

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "engine/runtime/block_allocator.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "parallel_test_util.h"

namespace moeserve::engine::parallel {
namespace {

using ::testing::HasSubstr;
using testing::RandomPlacement;
using testing::ReferenceLogits;
using testing::RelativeError;
using testing::TinyModel;
using testing::Tokens12;

ExpertPlacement DefaultPlacement(int extra = 0) {
  const ModelConfig& c = TinyModel().config();
  return ExpertPlacement::Default(c.num_moe_layers(), c.n_routed_experts,
                                  c.n_routed_experts + extra);
}

std::unique_ptr<ExpertParallelGroup> MakeGroup(int size, ExpertPlacement placement,
                                               bool overlap = false, int overlap_min_tokens = 32) {
  GroupOptions options;
  options.name = "test";
  options.size = size;
  options.two_batch_overlap = overlap;
  options.overlap_min_tokens = overlap_min_tokens;
  options.collective_timeout = std::chrono::seconds(20);
  auto group =
      ExpertParallelGroup::Create(TinyModel(), options, std::move(placement), nullptr, nullptr);
  EXPECT_TRUE(group.ok()) << group.status();
  return group.ok() ? std::move(*group) : nullptr;
}

// Rank threads that call Agree with no work until Stop(); each records, per step, the agreed
// placement version and the version of placement(rank) right after the agreement.
class IdleRanks {
 public:
  explicit IdleRanks(ExpertParallelGroup& group)
      : group_(group), agreed_(group.size()), used_(group.size()), statuses_(group.size()) {
    for (int rank = 0; rank < group.size(); ++rank) {
      threads_.emplace_back([this, rank] {
        while (true) {
          absl::StatusOr<StepAgreement> agreement = group_.Agree(rank, 0, stop_.load());
          if (!agreement.ok()) {
            statuses_[rank] = agreement.status();
            (void)group_.Fail(rank, agreement.status());
            return;
          }
          agreed_[rank].push_back(agreement->placement_version);
          used_[rank].push_back(group_.placement(rank).version());
          if (agreement->any_work) statuses_[rank] = absl::InternalError("work without tokens");
          if (agreement->stop) return;
        }
      });
    }
  }
  ~IdleRanks() { Stop(); }

  void Stop() {
    stop_ = true;
    for (auto& thread : threads_) {
      if (thread.joinable()) thread.join();
    }
  }
  const std::vector<int64_t>& agreed(int rank) const { return agreed_[rank]; }
  const std::vector<int64_t>& used(int rank) const { return used_[rank]; }
  absl::Status status() const {
    absl::Status status;
    for (const auto& s : statuses_) status.Update(s);
    return status;
  }

 private:
  ExpertParallelGroup& group_;
  std::atomic<bool> stop_{false};
  std::vector<std::vector<int64_t>> agreed_, used_;
  std::vector<absl::Status> statuses_;
  std::vector<std::thread> threads_;
};

// Every rank saw the same sequence of versions, step by step, and used what was agreed.
void ExpectRanksSwitchedTogether(const IdleRanks& ranks, int size) {
  for (int rank = 0; rank < size; ++rank) {
    EXPECT_EQ(ranks.agreed(rank), ranks.agreed(0))
        << "rank " << rank << " switched at another step";
    EXPECT_EQ(ranks.used(rank), ranks.agreed(rank)) << "rank " << rank;
  }
}

TEST(ExpertParallelGroupTest, CreateValidatesSizeAndPlacement) {
  GroupOptions options;
  options.size = 0;
  EXPECT_EQ(ExpertParallelGroup::Create(TinyModel(), options, DefaultPlacement(), nullptr, nullptr)
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  options.size = 3;  // 64 slots do not divide over 3 ranks
  EXPECT_EQ(ExpertParallelGroup::Create(TinyModel(), options, DefaultPlacement(), nullptr, nullptr)
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  auto group =
      ExpertParallelGroup::Create(TinyModel(), options, DefaultPlacement(2), nullptr, nullptr);
  ASSERT_TRUE(group.ok()) << group.status();
  EXPECT_EQ((*group)->size(), 3);
  for (int rank = 0; rank < 3; ++rank) {
    EXPECT_EQ((*group)->placement(rank).num_physical(), 66);
    EXPECT_EQ((*group)->resources(rank).compute->rank(), rank);
    EXPECT_EQ((*group)->resources(rank).compute->size(), 3);
    // Without overlap there is no communication thread.
    EXPECT_EQ((*group)->resources(rank).communication_thread, nullptr);
  }
}

TEST(ExpertParallelGroupTest, AgreementCombinesEveryRanksWork) {
  constexpr int kSize = 4;
  for (bool overlap : {false, true}) {
    auto group = MakeGroup(kSize, DefaultPlacement(), overlap, /*overlap_min_tokens=*/40);
    ASSERT_NE(group, nullptr);
    // Step 1: ranks bring 0, 5, 40, 0 tokens; step 2: nobody has work, rank 2 asks to stop.
    const int64_t tokens[2][kSize] = {{0, 5, 40, 0}, {0, 0, 0, 0}};
    std::vector<std::vector<StepAgreement>> agreements(kSize);
    std::vector<absl::Status> statuses(kSize);
    std::vector<std::thread> threads;
    for (int rank = 0; rank < kSize; ++rank) {
      threads.emplace_back([&, rank] {
        for (int step = 0; step < 2; ++step) {
          auto agreement = group->Agree(rank, tokens[step][rank], step == 1 && rank == 2);
          if (!agreement.ok()) {
            statuses[rank] = agreement.status();
            return;
          }
          agreements[rank].push_back(*agreement);
        }
      });
    }
    for (auto& thread : threads) thread.join();
    for (int rank = 0; rank < kSize; ++rank) {
      ASSERT_TRUE(statuses[rank].ok()) << statuses[rank];
      ASSERT_EQ(agreements[rank].size(), 2u);
      const StepAgreement& first = agreements[rank][0];
      EXPECT_TRUE(first.any_work);
      EXPECT_EQ(first.max_tokens, 40);
      EXPECT_EQ(first.split, overlap);  // 40 >= overlap_min_tokens
      EXPECT_FALSE(first.stop);
      EXPECT_EQ(first.placement_version, 0);
      const StepAgreement& second = agreements[rank][1];
      EXPECT_FALSE(second.any_work);
      EXPECT_EQ(second.max_tokens, 0);
      EXPECT_FALSE(second.split);
      EXPECT_TRUE(second.stop) << "rank " << rank << " did not learn that rank 2 stops";
    }
  }
}

TEST(ExpertParallelGroupTest, NewerPlacementCommitsWhileRanksStepAndAllSwitchTogether) {
  constexpr int kSize = 4;
  auto group = MakeGroup(kSize, DefaultPlacement(4));
  ASSERT_NE(group, nullptr);
  const ModelConfig& c = TinyModel().config();
  const ExpertPlacement newer = RandomPlacement(c.num_moe_layers(), c.n_routed_experts, 4, 11, 3);
  {
    IdleRanks ranks(*group);
    std::this_thread::sleep_for(std::chrono::milliseconds(20));  // some steps at version 0
    absl::Status status = group->UpdatePlacement(newer, std::chrono::seconds(10));
    ASSERT_TRUE(status.ok()) << status;
    EXPECT_EQ(group->committed_placement()->version(), 3);
    std::this_thread::sleep_for(std::chrono::milliseconds(20));  // some steps at version 3
    ranks.Stop();
    ASSERT_TRUE(ranks.status().ok()) << ranks.status();
    ExpectRanksSwitchedTogether(ranks, kSize);
    const std::vector<int64_t>& versions = ranks.agreed(0);
    ASSERT_FALSE(versions.empty());
    EXPECT_EQ(versions.front(), 0);
    EXPECT_EQ(versions.back(), 3);
    EXPECT_TRUE(std::is_sorted(versions.begin(), versions.end()));
    for (int64_t v : versions) EXPECT_TRUE(v == 0 || v == 3) << v;
  }
  for (int rank = 0; rank < kSize; ++rank) {
    EXPECT_EQ(group->placement(rank).version(), 3);
    for (int layer = 0; layer < c.num_moe_layers(); ++layer) {
      EXPECT_EQ(group->placement(rank).phy2log(layer), newer.phy2log(layer));
    }
  }
}

TEST(ExpertParallelGroupTest, SeveralUpdatesInARowEachCommit) {
  constexpr int kSize = 2;
  auto group = MakeGroup(kSize, DefaultPlacement(2));
  ASSERT_NE(group, nullptr);
  const ModelConfig& c = TinyModel().config();
  IdleRanks ranks(*group);
  for (int64_t version : {1, 2, 5, 9}) {
    absl::Status status = group->UpdatePlacement(
        RandomPlacement(c.num_moe_layers(), c.n_routed_experts, 2, 100 + version, version),
        std::chrono::seconds(10));
    ASSERT_TRUE(status.ok()) << status;
    EXPECT_EQ(group->committed_placement()->version(), version);
  }
  ranks.Stop();
  ASSERT_TRUE(ranks.status().ok()) << ranks.status();
  ExpectRanksSwitchedTogether(ranks, kSize);
  EXPECT_EQ(ranks.agreed(0).back(), 9);
}

TEST(ExpertParallelGroupTest, StaleVersionIsRefusedWithFailedPrecondition) {
  auto group = MakeGroup(2, DefaultPlacement());
  ASSERT_NE(group, nullptr);
  // Version 0 is what the group runs: not newer.
  absl::Status same = group->UpdatePlacement(DefaultPlacement(), std::chrono::seconds(1));
  EXPECT_EQ(same.code(), absl::StatusCode::kFailedPrecondition) << same;
  {
    IdleRanks ranks(*group);
    ASSERT_TRUE(
        group->UpdatePlacement(DefaultPlacement().WithVersion(4), std::chrono::seconds(10)).ok());
    ranks.Stop();
    ASSERT_TRUE(ranks.status().ok()) << ranks.status();
  }
  for (int64_t version : {4, 3, 0, -1}) {
    absl::Status stale =
        group->UpdatePlacement(DefaultPlacement().WithVersion(version), std::chrono::seconds(1));
    EXPECT_EQ(stale.code(), absl::StatusCode::kFailedPrecondition) << version << ": " << stale;
    EXPECT_THAT(std::string(stale.message()), HasSubstr("stale"));
  }
  EXPECT_EQ(group->committed_placement()->version(), 4);
  EXPECT_EQ(group->placement(0).version(), 4);
}

TEST(ExpertParallelGroupTest, WrongShapeIsRefusedWithInvalidArgument) {
  auto group = MakeGroup(2, DefaultPlacement(2));
  ASSERT_NE(group, nullptr);
  const ModelConfig& c = TinyModel().config();
  const std::vector<ExpertPlacement> wrong = {
      // More slots (still divisible by 2).
      ExpertPlacement::Default(c.num_moe_layers(), c.n_routed_experts, c.n_routed_experts + 4)
          .WithVersion(5),
      // One MoE layer too few.
      ExpertPlacement::Default(c.num_moe_layers() - 1, c.n_routed_experts, c.n_routed_experts + 2)
          .WithVersion(5),
      // Fewer logical experts.
      ExpertPlacement::Default(c.num_moe_layers(), c.n_routed_experts / 2, c.n_routed_experts + 2)
          .WithVersion(5),
      // Slots that do not divide over the 2 ranks.
      ExpertPlacement::Default(c.num_moe_layers(), c.n_routed_experts, c.n_routed_experts + 1)
          .WithVersion(5),
  };
  for (const ExpertPlacement& placement : wrong) {
    absl::Status status = group->UpdatePlacement(placement, std::chrono::seconds(1));
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  }
  EXPECT_EQ(group->committed_placement()->version(), 0);
  EXPECT_EQ(group->committed_placement()->num_physical(), c.n_routed_experts + 2);
  // A refused shape leaves nothing staged: the right shape at the same version still commits.
  IdleRanks ranks(*group);
  absl::Status status =
      group->UpdatePlacement(DefaultPlacement(2).WithVersion(5), std::chrono::seconds(10));
  EXPECT_TRUE(status.ok()) << status;
  ranks.Stop();
  EXPECT_TRUE(ranks.status().ok()) << ranks.status();
}

TEST(ExpertParallelGroupTest, UpdateWithoutSteppingRanksTimesOut) {
  auto group = MakeGroup(2, DefaultPlacement());
  ASSERT_NE(group, nullptr);
  const auto start = std::chrono::steady_clock::now();
  absl::Status status =
      group->UpdatePlacement(DefaultPlacement().WithVersion(1), std::chrono::milliseconds(150));
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_EQ(status.code(), absl::StatusCode::kDeadlineExceeded) << status;
  EXPECT_THAT(status.message(), HasSubstr("withdrawn"));
  EXPECT_GE(seconds, 0.1);
  EXPECT_LT(seconds, 5.0);
  EXPECT_EQ(group->placement(0).version(), 0);

  // Regression: an update that answered DEADLINE_EXCEEDED used to stay pending and commit as
  // soon as the ranks stepped again. An update that did not answer OK must change nothing.
  {
    IdleRanks ranks(*group);
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    ranks.Stop();
    EXPECT_TRUE(ranks.status().ok()) << ranks.status();
    for (int rank = 0; rank < 2; ++rank) {
      for (int64_t version : ranks.agreed(rank)) EXPECT_EQ(version, 0) << "rank " << rank;
    }
  }
  EXPECT_EQ(group->committed_placement()->version(), 0);
  EXPECT_EQ(group->placement(0).version(), 0);
  // The withdrawn update does not block the next one, even with the same version.
  IdleRanks ranks(*group);
  status = group->UpdatePlacement(DefaultPlacement().WithVersion(1), std::chrono::seconds(10));
  EXPECT_TRUE(status.ok()) << status;
  EXPECT_EQ(group->committed_placement()->version(), 1);
}

// Two updates racing: rank 0 enters a step having seen version 1 staged, rank 1 enters the same
// step after version 2 was requested. The ranks must still agree on one placement.
TEST(ExpertParallelGroupTest, ConcurrentUpdatesKeepRanksOnOnePlacement) {
  // Regression: Agree() commits when every rank has staged *some* version >= the minimum, but each
  // rank commits only if its own pending placement has exactly that minimum version. When
  // UpdatePlacement(v2) replaces a pending v1 between two ranks' reads of pending_, the rank that
  // read v1 commits v1 and the rank that read v2 stays at v0: both return an agreement with
  // different placement_version (dispatch then uses different phy2log on different ranks), and
  // every later Agree() failed with "ranks disagree on the placement version" for good. A
  // second update is now refused while one is pending.
  const ModelConfig& c = TinyModel().config();
  auto group = MakeGroup(2, DefaultPlacement(2));
  ASSERT_NE(group, nullptr);
  const ExpertPlacement v1 = RandomPlacement(c.num_moe_layers(), c.n_routed_experts, 2, 1, 1);
  const ExpertPlacement v2 = RandomPlacement(c.num_moe_layers(), c.n_routed_experts, 2, 2, 2);
  absl::Status update1, update2;
  std::thread updater1([&] { update1 = group->UpdatePlacement(v1, std::chrono::seconds(3)); });
  std::this_thread::sleep_for(std::chrono::milliseconds(100));  // v1 staged
  absl::StatusOr<StepAgreement> step0, step1;
  std::thread rank0([&] { step0 = group->Agree(0, 0, false); });  // reads v1, waits for rank 1
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  std::thread updater2([&] { update2 = group->UpdatePlacement(v2, std::chrono::seconds(3)); });
  std::this_thread::sleep_for(std::chrono::milliseconds(100));    // v2 staged
  std::thread rank1([&] { step1 = group->Agree(1, 0, false); });  // reads v2
  rank0.join();
  rank1.join();
  ASSERT_TRUE(step0.ok()) << step0.status();
  ASSERT_TRUE(step1.ok()) << step1.status();
  EXPECT_EQ(step0->placement_version, step1->placement_version);
  EXPECT_EQ(group->placement(0).version(), group->placement(1).version());
  // Once the ranks keep stepping both calls return: the second either commits (the group ends
  // on version 2) or is refused while the first is in progress (the group ends on version 1).
  IdleRanks ranks(*group);
  updater1.join();
  updater2.join();
  ranks.Stop();
  EXPECT_TRUE(ranks.status().ok()) << ranks.status();
  ExpectRanksSwitchedTogether(ranks, 2);
  EXPECT_TRUE(update1.ok()) << update1;
  const int64_t final_version = update2.ok() ? 2 : 1;
  if (!update2.ok()) {
    EXPECT_EQ(update2.code(), absl::StatusCode::kFailedPrecondition) << update2;
  }
  EXPECT_EQ(group->placement(0).version(), final_version);
  EXPECT_EQ(group->placement(1).version(), final_version);
}

// Serving across a live placement switch: ranks keep computing the same 12-token sequence every
// step while the placement changes; every step's logits equal the single-rank forward.
TEST(ExpertParallelGroupTest, OutputsDoNotChangeAcrossAPlacementSwitch) {
  constexpr int kSize = 4;
  const Model& model = TinyModel();
  const ModelConfig& c = model.config();
  auto group = MakeGroup(kSize, DefaultPlacement(4), /*overlap=*/true, /*overlap_min_tokens=*/1);
  ASSERT_NE(group, nullptr);
  const std::vector<int32_t> tokens = Tokens12();
  const std::vector<float> reference = ReferenceLogits(model, {{tokens, true}});
  std::atomic<bool> stop{false};
  std::vector<std::vector<int64_t>> versions(kSize);
  std::vector<double> worst(kSize, 0.0);
  std::vector<absl::Status> statuses(kSize);
  std::vector<std::thread> threads;
  for (int rank = 0; rank < kSize; ++rank) {
    threads.emplace_back([&, rank] {
      while (true) {
        auto agreement = group->Agree(rank, static_cast<int64_t>(tokens.size()), stop.load());
        if (!agreement.ok()) {
          statuses[rank] = agreement.status();
          (void)group->Fail(rank, agreement.status());
          return;
        }
        if (agreement->stop) return;
        KvRows cache(c.num_hidden_layers, 1, 16, model.kv_row_dim());
        BlockAllocator cache_blocks(cache.num_blocks());
        std::vector<int32_t> table = *cache_blocks.Allocate(1);
        BatchSequence sequence{tokens, 0, &table, true};
        auto logits = group->forward().Run({&sequence, 1}, cache, group->placement(rank),
                                           group->resources(rank), agreement->split);
        if (!logits.ok()) {
          statuses[rank] = logits.status();
          (void)group->Fail(rank, logits.status());
          return;
        }
        versions[rank].push_back(agreement->placement_version);
        worst[rank] = std::max(worst[rank], RelativeError(*logits, reference));
      }
    });
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  absl::Status update = group->UpdatePlacement(
      RandomPlacement(c.num_moe_layers(), c.n_routed_experts, 4, 8, 6), std::chrono::seconds(10));
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  stop = true;
  for (auto& thread : threads) thread.join();
  ASSERT_TRUE(update.ok()) << update;
  for (int rank = 0; rank < kSize; ++rank) {
    ASSERT_TRUE(statuses[rank].ok()) << statuses[rank];
    EXPECT_EQ(versions[rank], versions[0]) << "rank " << rank;
    EXPECT_LE(worst[rank], 1e-5) << "rank " << rank;
  }
  ASSERT_FALSE(versions[0].empty());
  EXPECT_EQ(versions[0].back(), 6);
}

}  // namespace
}  // namespace moeserve::engine::parallel
