#include "engine/pipeline/simulator.h"

#include <algorithm>
#include <map>
#include <tuple>
#include <vector>

#include "absl/status/status.h"
#include "engine/pipeline/report.h"
#include "engine/pipeline/schedule.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moeserve::engine::pipeline {
namespace {

using ::testing::HasSubstr;

// The unit costs under which DeepSeek quotes the bubble formulas: an overlapped pair costs as
// much as its two halves, so busy time is the same for every schedule and rank.
constexpr OperationDurations kUnitCosts{
    .forward = 1, .backward = 2, .weight = 1, .forward_backward = 3};

PipelineSchedule MustMake(PipelineAlgorithm algorithm, int ranks, int chunks,
                          bool forward_only = false) {
  absl::StatusOr<PipelineSchedule> schedule =
      MakePipelineSchedule(algorithm, ranks, chunks, forward_only);
  EXPECT_TRUE(schedule.ok()) << schedule.status();
  return *std::move(schedule);
}

SimulationResult MustSimulate(const PipelineSchedule& schedule,
                              const OperationDurations& durations = kUnitCosts) {
  absl::StatusOr<SimulationResult> result = SimulatePipeline(schedule, durations);
  EXPECT_TRUE(result.ok()) << result.status();
  return *std::move(result);
}

TEST(SimulatorTest, OneForwardOneBackwardBubbleIsPublishedFormulaOnEveryRank) {
  for (int stages : {4, 8, 16}) {
    for (int chunks : {stages, 2 * stages, 3 * stages + 1}) {
      SimulationResult result =
          MustSimulate(MustMake(PipelineAlgorithm::kOneForwardOneBackward, stages, chunks));
      for (int rank = 0; rank < stages; ++rank) {
        EXPECT_DOUBLE_EQ(result.ranks[rank].bubble, (stages - 1) * (1.0 + 2.0))
            << "PP=" << stages << " N=" << chunks << " rank=" << rank;
      }
      EXPECT_DOUBLE_EQ(result.makespan, chunks * 3.0 + (stages - 1) * 3.0);
    }
  }
}

TEST(SimulatorTest, ZeroBubbleOnePBubbleIsPublishedFormulaOnEveryRank) {
  const OperationDurations other_costs[] = {
      kUnitCosts,
      {.forward = 1, .backward = 2, .weight = 0.5, .forward_backward = 3},
      {.forward = 2, .backward = 3, .weight = 1, .forward_backward = 5},
  };
  for (const OperationDurations& durations : other_costs) {
    for (int stages : {4, 8, 16}) {
      // (PP-1)(F+B-2W)
      const double formula =
          (stages - 1) * (durations.forward + durations.backward - 2 * durations.weight);
      EXPECT_DOUBLE_EQ(ZeroBubbleOnePBubble(stages, durations), formula);
      for (int chunks : {stages, 2 * stages, 3 * stages + 1}) {
        SimulationResult result =
            MustSimulate(MustMake(PipelineAlgorithm::kZeroBubbleOneP, stages, chunks), durations);
        for (int rank = 0; rank < stages; ++rank) {
          EXPECT_DOUBLE_EQ(result.ranks[rank].bubble, formula)
              << "PP=" << stages << " N=" << chunks << " rank=" << rank;
          // Same in-flight count as 1F1B's first rank, on every rank.
          EXPECT_EQ(result.ranks[rank].peak_activations, stages);
        }
      }
    }
  }
}

TEST(SimulatorTest, DualPipeBubbleIsPublishedFormulaOnEveryRank) {
  for (int stages : {4, 8, 16}) {
    // (PP/2-1)(F&B+B-3W) with F&B=3, B=2, W=1.
    const double formula = (stages / 2 - 1) * (3.0 + 2.0 - 3.0);
    EXPECT_DOUBLE_EQ(DualPipeBubble(stages, kUnitCosts), formula);
    for (int chunks : {2 * stages, 2 * stages + 2, 4 * stages}) {
      SimulationResult result =
          MustSimulate(MustMake(PipelineAlgorithm::kDualPipe, stages, chunks));
      for (int rank = 0; rank < stages; ++rank) {
        EXPECT_DOUBLE_EQ(result.ranks[rank].busy, chunks * 3.0);
        EXPECT_DOUBLE_EQ(result.ranks[rank].bubble, formula)
            << "PP=" << stages << " N=" << chunks << " rank=" << rank;
      }
    }
  }
  // DeepSeek's figure: 8 ranks, 20 micro-batches, 66 time units.
  EXPECT_DOUBLE_EQ(MustSimulate(MustMake(PipelineAlgorithm::kDualPipe, 8, 20)).makespan, 66);
}

// When the overlapped pair is cheaper than its halves (B <= F&B < F+B), ranks differ in how many
// pairs they overlap. The formula is then the bubble of the middle ranks, which run one pair
// unoverlapped and so carry the largest bubble.
TEST(SimulatorTest, DualPipeFormulaIsTheMiddleRanksBubbleWhenOverlapSavesTime) {
  for (double forward_backward : {2.0, 2.25, 2.5}) {
    OperationDurations durations = kUnitCosts;
    durations.forward_backward = forward_backward;
    for (int stages : {4, 8, 16}) {
      const double formula = DualPipeBubble(stages, durations);
      for (int chunks : {2 * stages, 2 * stages + 6}) {
        SimulationResult result =
            MustSimulate(MustMake(PipelineAlgorithm::kDualPipe, stages, chunks), durations);
        double worst = 0;
        for (const RankTimeline& rank : result.ranks) worst = std::max(worst, rank.bubble);
        EXPECT_DOUBLE_EQ(worst, formula) << "F&B=" << forward_backward << " PP=" << stages;
        EXPECT_DOUBLE_EQ(result.ranks[stages / 2 - 1].bubble, formula);
        EXPECT_DOUBLE_EQ(result.ranks[stages / 2].bubble, formula);
      }
    }
  }
}

TEST(SimulatorTest, DualPipeVBubbleIsPublishedFormulaWithTwoStagesPerRank) {
  for (int ranks : {2, 4, 8}) {
    const double formula = DualPipeBubble(2 * ranks, kUnitCosts);
    for (int chunks : {2 * ranks, 2 * ranks + 1, 5 * ranks}) {
      SimulationResult result =
          MustSimulate(MustMake(PipelineAlgorithm::kDualPipeV, ranks, chunks));
      for (int rank = 0; rank < ranks; ++rank) {
        EXPECT_DOUBLE_EQ(result.ranks[rank].bubble, formula)
            << "R=" << ranks << " N=" << chunks << " rank=" << rank;
      }
    }
  }
}

TEST(SimulatorTest, DualPipePeakActivationsArePpPlusOneOnEveryRankForAnyChunkCount) {
  for (int stages : {2, 4, 6, 8, 16}) {
    for (int chunks = 2 * stages; chunks <= 4 * stages + 6; chunks += 2) {
      SimulationResult result =
          MustSimulate(MustMake(PipelineAlgorithm::kDualPipe, stages, chunks));
      for (int rank = 0; rank < stages; ++rank) {
        EXPECT_EQ(result.ranks[rank].peak_activations, stages + 1)
            << "PP=" << stages << " N=" << chunks << " rank=" << rank;
      }
    }
  }
  for (int ranks : {2, 4, 8}) {
    SimulationResult result =
        MustSimulate(MustMake(PipelineAlgorithm::kDualPipeV, ranks, 3 * ranks));
    for (const RankTimeline& rank : result.ranks) EXPECT_EQ(rank.peak_activations, 2 * ranks + 1);
  }
}

TEST(SimulatorTest, OneForwardOneBackwardRankHoldsActivationsOfTheStagesAfterIt) {
  SimulationResult result =
      MustSimulate(MustMake(PipelineAlgorithm::kOneForwardOneBackward, 8, 20));
  for (int rank = 0; rank < 8; ++rank) EXPECT_EQ(result.ranks[rank].peak_activations, 8 - rank);
}

TEST(SimulatorTest, TimelineFollowsEveryDependency) {
  OperationDurations durations = kUnitCosts;
  durations.point_to_point_latency = 0.25;
  for (PipelineAlgorithm algorithm :
       {PipelineAlgorithm::kDualPipe, PipelineAlgorithm::kDualPipeV,
        PipelineAlgorithm::kOneForwardOneBackward, PipelineAlgorithm::kZeroBubbleOneP}) {
    PipelineSchedule schedule = MustMake(algorithm, 4, 12);
    SimulationResult result = MustSimulate(schedule, durations);
    using Key = std::tuple<int, int, int>;
    std::map<Key, std::pair<double, double>> forward;   // start, end
    std::map<Key, std::pair<double, double>> backward;  // input backward start, end
    for (int rank = 0; rank < schedule.num_ranks; ++rank) {
      double previous_end = 0;
      for (const TimedOperation& timed : result.ranks[rank].operations) {
        EXPECT_GE(timed.start, previous_end) << "operations overlap on rank " << rank;
        previous_end = timed.end;
        const Operation& operation = timed.operation;
        if (operation.HasForward()) {
          const ChunkRef& c = operation.forward;
          forward[{c.direction, c.microbatch, c.stage}] = {timed.start, timed.end};
        }
        if (operation.HasInputBackward()) {
          const ChunkRef& c = operation.backward;
          backward[{c.direction, c.microbatch, c.stage}] = {timed.start, timed.end};
        }
      }
    }
    for (const auto& [key, times] : forward) {
      auto [direction, microbatch, stage] = key;
      if (stage > 0) {
        const double crossing =
            schedule.RankOfStage(direction, stage) == schedule.RankOfStage(direction, stage - 1)
                ? 0
                : durations.point_to_point_latency;
        EXPECT_GE(times.first, forward.at({direction, microbatch, stage - 1}).second + crossing);
      }
      EXPECT_GE(backward.at(key).first, times.second);
      if (stage + 1 < schedule.num_stages) {
        EXPECT_GE(backward.at(key).first, backward.at({direction, microbatch, stage + 1}).second);
      }
    }
  }
}

TEST(SimulatorTest, NoScheduleDeadlocks) {
  for (bool forward_only : {false, true}) {
    for (int ranks = 1; ranks <= 12; ++ranks) {
      for (int chunks : {2 * ranks, 2 * ranks + 1, 2 * ranks + 2, 3 * ranks + 5}) {
        for (PipelineAlgorithm algorithm :
             {PipelineAlgorithm::kDualPipe, PipelineAlgorithm::kDualPipeV,
              PipelineAlgorithm::kOneForwardOneBackward, PipelineAlgorithm::kZeroBubbleOneP}) {
          absl::StatusOr<PipelineSchedule> schedule =
              MakePipelineSchedule(algorithm, ranks, chunks, forward_only);
          if (!schedule.ok()) continue;  // e.g. odd ranks for DualPipe
          absl::StatusOr<SimulationResult> result = SimulatePipeline(*schedule, kUnitCosts);
          EXPECT_TRUE(result.ok()) << PipelineAlgorithmName(algorithm) << " R=" << ranks
                                   << " N=" << chunks << ": " << result.status();
          if (forward_only && result.ok()) {
            for (const RankTimeline& rank : result->ranks) EXPECT_EQ(rank.peak_activations, 0);
          }
        }
      }
    }
  }
}

TEST(SimulatorTest, PointToPointLatencyLengthensTheStep) {
  PipelineSchedule schedule = MustMake(PipelineAlgorithm::kDualPipe, 8, 20);
  OperationDurations slow_links = kUnitCosts;
  slow_links.point_to_point_latency = 0.5;
  EXPECT_GT(MustSimulate(schedule, slow_links).makespan, MustSimulate(schedule).makespan);
}

TEST(SimulatorTest, ReportsDeadlockWithWhereEachRankWaits) {
  // Rank 0 starts with the backward of micro-batch 0, whose gradient needs rank 1's backward,
  // which needs rank 0's forward, which is queued behind that backward.
  PipelineSchedule schedule = MustMake(PipelineAlgorithm::kOneForwardOneBackward, 2, 2);
  std::vector<Operation>& rank0 = schedule.rank_operations[0];
  std::rotate(rank0.begin(), rank0.begin() + 2, rank0.end());  // B0.0 B0.1 F0.0 F0.1
  absl::StatusOr<SimulationResult> result = SimulatePipeline(schedule, kUnitCosts);
  EXPECT_EQ(result.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(result.status().message(), HasSubstr("deadlock"));
  EXPECT_THAT(result.status().message(), HasSubstr("rank 0 at operation 0 (B0.0)"));
  EXPECT_THAT(result.status().message(), HasSubstr("rank 1 at operation 0 (F0.0)"));
}

TEST(SimulatorTest, RejectsMalformedSchedules) {
  PipelineSchedule wrong_rank = MustMake(PipelineAlgorithm::kOneForwardOneBackward, 2, 2);
  wrong_rank.rank_operations[0][0].forward.stage = 1;
  EXPECT_THAT(SimulatePipeline(wrong_rank, kUnitCosts).status().message(),
              HasSubstr("belongs to rank 1"));

  PipelineSchedule repeated = MustMake(PipelineAlgorithm::kOneForwardOneBackward, 2, 2);
  repeated.rank_operations[1].push_back(repeated.rank_operations[1][0]);
  EXPECT_EQ(SimulatePipeline(repeated, kUnitCosts).status().code(),
            absl::StatusCode::kInvalidArgument);

  PipelineSchedule orphan_weight = MustMake(PipelineAlgorithm::kOneForwardOneBackward, 2, 2);
  orphan_weight.rank_operations[1].push_back({OperationKind::kWeight, {}, {0, 0, 1}});
  EXPECT_THAT(SimulatePipeline(orphan_weight, kUnitCosts).status().message(),
              HasSubstr("no earlier input-only backward"));
}

TEST(OperationDurationsTest, ParsesTheCommandSyntax) {
  absl::StatusOr<OperationDurations> full = ParseOperationDurations("F=1,B=2,W=1,FB=3");
  ASSERT_TRUE(full.ok()) << full.status();
  EXPECT_EQ(full->forward, 1);
  EXPECT_EQ(full->backward, 2);
  EXPECT_EQ(full->weight, 1);
  EXPECT_EQ(full->forward_backward, 3);
  EXPECT_EQ(full->point_to_point_latency, 0);

  absl::StatusOr<OperationDurations> partial = ParseOperationDurations("f=1.5, F&B=2.5,p2p=0.1");
  ASSERT_TRUE(partial.ok()) << partial.status();
  EXPECT_EQ(partial->forward, 1.5);
  EXPECT_EQ(partial->backward, 2);
  EXPECT_EQ(partial->forward_backward, 2.5);
  EXPECT_EQ(partial->point_to_point_latency, 0.1);
  EXPECT_EQ(FormatOperationDurations(*partial), "F=1.5,B=2,W=1,FB=2.5,P2P=0.1");
}

TEST(OperationDurationsTest, RejectsWhatItCannotUse) {
  struct Case {
    const char* text;
    const char* message;
  };
  for (const Case& bad :
       {Case{"F=abc", "not KEY=NUMBER"}, Case{"X=1", "unknown key"},
        Case{"W=2", "shorter than the full backward"}, Case{"F=1,F=2", "given twice"},
        Case{"", "empty"}, Case{"F=-1", "finite number >= 0"}, Case{"B=inf", "finite number"},
        Case{"FB=0", "greater than 0"}}) {
    absl::StatusOr<OperationDurations> durations = ParseOperationDurations(bad.text);
    EXPECT_EQ(durations.status().code(), absl::StatusCode::kInvalidArgument) << bad.text;
    EXPECT_THAT(durations.status().message(), HasSubstr(bad.message)) << bad.text;
  }
}

}  // namespace
}  // namespace moeserve::engine::pipeline
