#include "engine/pipeline/schedule.h"

#include <algorithm>
#include <deque>
#include <map>
#include <tuple>
#include <vector>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moeserve::engine::pipeline {
namespace {

using ::testing::HasSubstr;

using ChunkKey = std::tuple<int, int, int>;  // direction, micro-batch, stage

ChunkKey Key(const ChunkRef& chunk) { return {chunk.direction, chunk.microbatch, chunk.stage}; }

PipelineSchedule MustMake(PipelineAlgorithm algorithm, int ranks, int chunks,
                          bool forward_only = false) {
  absl::StatusOr<PipelineSchedule> schedule =
      MakePipelineSchedule(algorithm, ranks, chunks, forward_only);
  EXPECT_TRUE(schedule.ok()) << schedule.status();
  return *std::move(schedule);
}

std::vector<OperationKind> KindsOf(const std::vector<Operation>& operations) {
  std::vector<OperationKind> kinds;
  for (const Operation& operation : operations) kinds.push_back(operation.kind);
  return kinds;
}

// Every (direction, micro-batch, stage) runs exactly one forward and one input backward, on the
// rank that holds the stage; within a rank a chunk's forward comes before its backward; and each
// (direction, stage) runs its micro-batches in increasing order, forward and backward.
void ExpectEachChunkOnceInOrder(const PipelineSchedule& schedule) {
  std::map<ChunkKey, int> forwards;
  std::map<ChunkKey, int> backwards;
  for (int rank = 0; rank < schedule.num_ranks; ++rank) {
    std::map<std::pair<int, int>, int> last_forward;  // (direction, stage) -> micro-batch
    std::map<std::pair<int, int>, int> last_backward;
    std::map<ChunkKey, bool> forward_done_here;
    for (const Operation& operation : schedule.rank_operations[rank]) {
      if (operation.HasForward()) {
        const ChunkRef& chunk = operation.forward;
        EXPECT_EQ(schedule.RankOfStage(chunk.direction, chunk.stage), rank);
        ++forwards[Key(chunk)];
        forward_done_here[Key(chunk)] = true;
        auto [it, inserted] = last_forward.try_emplace({chunk.direction, chunk.stage}, -1);
        EXPECT_EQ(chunk.microbatch, it->second + 1) << "forwards out of order on rank " << rank;
        it->second = chunk.microbatch;
      }
      if (operation.HasInputBackward()) {
        const ChunkRef& chunk = operation.backward;
        EXPECT_EQ(schedule.RankOfStage(chunk.direction, chunk.stage), rank);
        ++backwards[Key(chunk)];
        EXPECT_TRUE(forward_done_here[Key(chunk)]) << "backward before forward on rank " << rank
                                                   << ": " << FormatOperation(schedule, operation);
        auto [it, inserted] = last_backward.try_emplace({chunk.direction, chunk.stage}, -1);
        EXPECT_EQ(chunk.microbatch, it->second + 1) << "backwards out of order on rank " << rank;
        it->second = chunk.microbatch;
      }
    }
  }
  const int expected_chunks =
      schedule.num_directions * schedule.MicrobatchesPerDirection() * schedule.num_stages;
  EXPECT_EQ(static_cast<int>(forwards.size()), expected_chunks);
  for (const auto& [key, count] : forwards) EXPECT_EQ(count, 1);
  if (schedule.forward_only) {
    EXPECT_TRUE(backwards.empty());
  } else {
    EXPECT_EQ(static_cast<int>(backwards.size()), expected_chunks);
    for (const auto& [key, count] : backwards) EXPECT_EQ(count, 1);
  }
}

// Each W computes the weight gradient of the oldest input-only backward still pending on its
// rank, and none is left pending at the end.
void ExpectWeightsFifo(const PipelineSchedule& schedule) {
  for (int rank = 0; rank < schedule.num_ranks; ++rank) {
    std::deque<ChunkKey> pending;
    for (const Operation& operation : schedule.rank_operations[rank]) {
      if (operation.kind == OperationKind::kBackwardInput)
        pending.push_back(Key(operation.backward));
      if (operation.kind == OperationKind::kWeight) {
        ASSERT_FALSE(pending.empty()) << "W without a pending Bi on rank " << rank;
        EXPECT_EQ(Key(operation.backward), pending.front())
            << "W out of FIFO order on rank " << rank;
        pending.pop_front();
      }
    }
    EXPECT_TRUE(pending.empty()) << "Bi without W on rank " << rank;
  }
}

TEST(DualPipeScheduleTest, EightRanksTwentyChunksMatchesThePhaseTable) {
  PipelineSchedule schedule = MustMake(PipelineAlgorithm::kDualPipe, 8, 20);
  // Rank 0 (h = 0): 6 F0, 1 x (F0 F1), 3 x (Bi1 W F1), 3 x 2 F&B, 3 x (B1 F&B), B1 B0i (even h:
  // iteration 0's B1 stays full), 3 x (W Bi0), W.
  EXPECT_EQ(FormatRankSchedule(schedule, 0),
            "rank 0: F0.0 F0.1 F0.2 F0.3 F0.4 F0.5 F0.6 F1.0 B1.0i W1.0 F1.1 B1.1i W1.1 F1.2 "
            "B1.2i W1.2 F1.3 [F0.7|B1.3] [F1.4|B0.0] [F0.8|B1.4] [F1.5|B0.1] [F0.9|B1.5] "
            "[F1.6|B0.2] B1.6 [F1.7|B0.3] B1.7 [F1.8|B0.4] B1.8 [F1.9|B0.5] B1.9 B0.6i W0.6 "
            "B0.7i W0.7 B0.8i W0.8 B0.9i W0.9");
  // Rank 3 is a middle rank (h = 3 = H-1): its first phase-4 pair runs as F then B, and with odd
  // h phase 6 switches to input-only backwards from iteration 2 on.
  EXPECT_EQ(FormatRankSchedule(schedule, 3),
            "rank 3: F0.0 F1.0 F0.1 F1.1 F0.2 F1.2 F0.3 F1.3 F0.4 B1.0 [F1.4|B0.0] [F0.5|B1.1] "
            "[F1.5|B0.1] [F0.6|B1.2] [F1.6|B0.2] [F0.7|B1.3] [F1.7|B0.3] [F0.8|B1.4] "
            "[F1.8|B0.4] [F0.9|B1.5] [F1.9|B0.5] B1.6 B0.6 B1.7 B0.7 B1.8i B0.8i B1.9i B0.9i "
            "W1.8 W0.8 W1.9 W0.9");
  // Ranks in the second half mirror the first with the directions swapped.
  EXPECT_THAT(FormatRankSchedule(schedule, 7),
              testing::StartsWith("rank 7: F1.0 F1.1 F1.2 F1.3 F1.4 F1.5 F1.6 F0.0 B0.0i W0.0 "));
}

TEST(DualPipeScheduleTest, SmallestPipeline) {
  PipelineSchedule schedule = MustMake(PipelineAlgorithm::kDualPipe, 2, 4);
  EXPECT_EQ(FormatRankSchedule(schedule, 0),
            "rank 0: F0.0 F1.0 F0.1 B1.0 [F1.1|B0.0] B1.1 B0.1i W0.1");
  EXPECT_EQ(FormatRankSchedule(schedule, 1),
            "rank 1: F1.0 F0.0 F1.1 B0.0 [F0.1|B1.0] B0.1 B1.1i W1.1");
}

TEST(DualPipeScheduleTest, EveryChunkOnceInDependencyOrderWithFifoWeights) {
  for (int ranks : {2, 4, 6, 8, 16}) {
    for (int chunks : {2 * ranks, 2 * ranks + 2, 3 * ranks + (3 * ranks) % 2, 4 * ranks + 6}) {
      SCOPED_TRACE(testing::Message() << "ranks=" << ranks << " chunks=" << chunks);
      PipelineSchedule schedule = MustMake(PipelineAlgorithm::kDualPipe, ranks, chunks);
      ExpectEachChunkOnceInOrder(schedule);
      ExpectWeightsFifo(schedule);
    }
  }
}

TEST(DualPipeScheduleTest, OverlappedPairCountPerRank) {
  for (int ranks : {2, 4, 8, 16}) {
    for (int chunks : {2 * ranks, 2 * ranks + 4, 4 * ranks}) {
      PipelineSchedule schedule = MustMake(PipelineAlgorithm::kDualPipe, ranks, chunks);
      const int half_ranks = ranks / 2;
      for (int rank = 0; rank < ranks; ++rank) {
        const int half_rank = std::min(rank, ranks - 1 - rank);
        const bool middle = half_rank == half_ranks - 1;
        const int expected = chunks - 3 * half_ranks + half_rank + 1 - (middle ? 1 : 0);
        const std::vector<OperationKind> kinds = KindsOf(schedule.rank_operations[rank]);
        EXPECT_EQ(std::count(kinds.begin(), kinds.end(), OperationKind::kForwardBackward), expected)
            << "ranks=" << ranks << " chunks=" << chunks << " rank=" << rank;
      }
    }
  }
}

TEST(DualPipeScheduleTest, RejectsArgumentsItCannotSchedule) {
  struct Case {
    int ranks;
    int chunks;
    const char* message;
  };
  for (const Case& bad : {Case{7, 20, "even number of ranks"}, Case{8, 21, "even number of micro"},
                          Case{8, 14, "at least 16 micro-batches"}, Case{0, 20, "--ranks"},
                          Case{8, 0, "--chunks"}, Case{1000, 4000, "--ranks"}}) {
    absl::StatusOr<PipelineSchedule> schedule = MakeDualPipeSchedule(bad.ranks, bad.chunks, false);
    EXPECT_EQ(schedule.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(schedule.status().message(), HasSubstr(bad.message));
  }
}

TEST(DualPipeVScheduleTest, SameOperationsAsDualPipeOnTwiceTheRanksAndChunks) {
  for (int ranks = 1; ranks <= 8; ++ranks) {
    for (int chunks : {2 * ranks, 2 * ranks + 1, 2 * ranks + 3, 5 * ranks}) {
      PipelineSchedule v_shape = MustMake(PipelineAlgorithm::kDualPipeV, ranks, chunks);
      PipelineSchedule dual = MustMake(PipelineAlgorithm::kDualPipe, 2 * ranks, 2 * chunks);
      for (int rank = 0; rank < ranks; ++rank) {
        EXPECT_EQ(KindsOf(v_shape.rank_operations[rank]), KindsOf(dual.rank_operations[rank]))
            << "ranks=" << ranks << " chunks=" << chunks << " rank=" << rank;
      }
    }
  }
}

TEST(DualPipeVScheduleTest, EveryMicrobatchGoesDownAndBack) {
  for (int ranks : {1, 2, 3, 4, 8}) {
    for (int chunks : {2 * ranks, 2 * ranks + 1, 4 * ranks}) {
      SCOPED_TRACE(testing::Message() << "ranks=" << ranks << " chunks=" << chunks);
      PipelineSchedule schedule = MustMake(PipelineAlgorithm::kDualPipeV, ranks, chunks);
      EXPECT_EQ(schedule.num_stages, 2 * ranks);
      for (int stage = 0; stage < 2 * ranks; ++stage) {
        EXPECT_EQ(schedule.RankOfStage(0, stage), stage < ranks ? stage : 2 * ranks - 1 - stage);
      }
      ExpectEachChunkOnceInOrder(schedule);
      ExpectWeightsFifo(schedule);
    }
  }
  // The leg, not the (single) direction, is the first number of the text form.
  PipelineSchedule schedule = MustMake(PipelineAlgorithm::kDualPipeV, 2, 4);
  EXPECT_EQ(FormatRankSchedule(schedule, 1),
            "rank 1: F0.0 F1.0 F0.1 F1.1 F0.2 B1.0 [F1.2|B0.0] [F0.3|B1.1] [F1.3|B0.1] B1.2 "
            "B0.2 B1.3i B0.3i W1.3 W0.3");
}

TEST(DualPipeVScheduleTest, RejectsTooFewMicrobatches) {
  absl::StatusOr<PipelineSchedule> schedule = MakeDualPipeVSchedule(4, 7, false);
  EXPECT_EQ(schedule.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(schedule.status().message(), HasSubstr("at least 8 micro-batches"));
}

TEST(OneForwardOneBackwardScheduleTest, WarmupThenAlternate) {
  PipelineSchedule schedule = MustMake(PipelineAlgorithm::kOneForwardOneBackward, 4, 6);
  EXPECT_EQ(FormatRankSchedule(schedule, 0),
            "rank 0: F0.0 F0.1 F0.2 F0.3 B0.0 F0.4 B0.1 F0.5 B0.2 B0.3 B0.4 B0.5");
  EXPECT_EQ(FormatRankSchedule(schedule, 3),
            "rank 3: F0.0 B0.0 F0.1 B0.1 F0.2 B0.2 F0.3 B0.3 F0.4 B0.4 F0.5 B0.5");
  for (int ranks : {1, 4, 8}) {
    for (int chunks : {1, 3, 8, 20}) {
      ExpectEachChunkOnceInOrder(
          MustMake(PipelineAlgorithm::kOneForwardOneBackward, ranks, chunks));
    }
  }
}

TEST(ZeroBubbleOnePScheduleTest, OneForwardOneBackwardWithWeightGradientsDeferredByRank) {
  PipelineSchedule schedule = MustMake(PipelineAlgorithm::kZeroBubbleOneP, 4, 6);
  // Rank 0 warms up like 1F1B and defers nothing; rank 3 defers 3 W's to the cool-down.
  EXPECT_EQ(FormatRankSchedule(schedule, 0),
            "rank 0: F0.0 F0.1 F0.2 F0.3 B0.0i W0.0 F0.4 B0.1i W0.1 F0.5 B0.2i W0.2 B0.3i W0.3 "
            "B0.4i W0.4 B0.5i W0.5");
  EXPECT_EQ(FormatRankSchedule(schedule, 3),
            "rank 3: F0.0 B0.0i F0.1 B0.1i F0.2 B0.2i F0.3 B0.3i W0.0 F0.4 B0.4i W0.1 F0.5 "
            "B0.5i W0.2 W0.3 W0.4 W0.5");
  for (int ranks : {1, 2, 4, 8}) {
    for (int chunks : {1, 3, ranks, 2 * ranks + 1}) {
      SCOPED_TRACE(testing::Message() << "ranks=" << ranks << " chunks=" << chunks);
      PipelineSchedule zero_bubble = MustMake(PipelineAlgorithm::kZeroBubbleOneP, ranks, chunks);
      ExpectEachChunkOnceInOrder(zero_bubble);
      ExpectWeightsFifo(zero_bubble);
    }
  }
}

TEST(ForwardOnlyTest, KeepsTheForwardOrderAndDropsEveryBackward) {
  for (PipelineAlgorithm algorithm : {PipelineAlgorithm::kDualPipe, PipelineAlgorithm::kDualPipeV,
                                      PipelineAlgorithm::kOneForwardOneBackward}) {
    PipelineSchedule training = MustMake(algorithm, 4, 12);
    PipelineSchedule inference = MustMake(algorithm, 4, 12, /*forward_only=*/true);
    ExpectEachChunkOnceInOrder(inference);
    for (int rank = 0; rank < 4; ++rank) {
      std::vector<ChunkKey> training_forwards;
      for (const Operation& operation : training.rank_operations[rank]) {
        if (operation.HasForward()) training_forwards.push_back(Key(operation.forward));
      }
      std::vector<ChunkKey> inference_forwards;
      for (const Operation& operation : inference.rank_operations[rank]) {
        EXPECT_EQ(operation.kind, OperationKind::kForward);
        inference_forwards.push_back(Key(operation.forward));
      }
      EXPECT_EQ(inference_forwards, training_forwards);
    }
  }
}

TEST(PipelineAlgorithmTest, ParsesTheCommandNames) {
  EXPECT_EQ(*ParsePipelineAlgorithm("dualpipe"), PipelineAlgorithm::kDualPipe);
  EXPECT_EQ(*ParsePipelineAlgorithm("dualpipev"), PipelineAlgorithm::kDualPipeV);
  EXPECT_EQ(*ParsePipelineAlgorithm("1f1b"), PipelineAlgorithm::kOneForwardOneBackward);
  absl::StatusOr<PipelineAlgorithm> unknown = ParsePipelineAlgorithm("gpipe");
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(*ParsePipelineAlgorithm("zb1p"), PipelineAlgorithm::kZeroBubbleOneP);
  EXPECT_THAT(unknown.status().message(), HasSubstr("dualpipe, dualpipev, 1f1b or zb1p"));
}

}  // namespace
}  // namespace moeserve::engine::pipeline
