#include "engine/pipeline/schedule.h"

#include <algorithm>
#include <array>
#include <deque>
#include <functional>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace moeserve::engine::pipeline {
namespace {

// Generous bounds for a planning tool; they keep a typo (--chunks 1000000000) from allocating
// gigabytes of operations.
constexpr int kMaxRanks = 256;
constexpr int kMaxMicrobatches = 4096;

absl::Status CheckBounds(const char* algorithm_name, int num_ranks, int num_microbatches) {
  if (num_ranks < 1 || num_ranks > kMaxRanks) {
    return absl::InvalidArgumentError(
        absl::StrCat(algorithm_name, ": --ranks must be in [1, ", kMaxRanks, "], got ", num_ranks));
  }
  if (num_microbatches < 1 || num_microbatches > kMaxMicrobatches) {
    return absl::InvalidArgumentError(absl::StrCat(algorithm_name, ": --chunks must be in [1, ",
                                                   kMaxMicrobatches, "], got ", num_microbatches));
  }
  return absl::OkStatus();
}

// Maps a rank-local phase (0: the direction or leg a rank starts its forwards with, 1: the
// other) and a micro-batch index within it to the chunk that rank runs.
using ChunkOfLocalPhase = std::function<ChunkRef(int local_phase, int microbatch)>;

// Appends one rank's operations while tracking, per local phase, the next micro-batch to run
// forward and backward, and the FIFO of input-only backwards whose weight gradients are pending.
class RankOperationBuilder {
 public:
  explicit RankOperationBuilder(ChunkOfLocalPhase chunk_of_local_phase)
      : chunk_of_local_phase_(std::move(chunk_of_local_phase)) {}

  void Forward(int phase) {
    operations_.push_back({OperationKind::kForward, NextForward(phase), {}});
  }

  void Backward(int phase, bool input_only) {
    ChunkRef chunk = NextBackward(phase);
    if (input_only) {
      pending_weight_chunks_.push_back(chunk);
      operations_.push_back({OperationKind::kBackwardInput, {}, chunk});
    } else {
      operations_.push_back({OperationKind::kBackward, {}, chunk});
    }
  }

  // Weight gradient of the oldest pending input-only backward. The phase counts guarantee one is
  // pending; should a generator change break that, the W is left out (rather than reading an
  // empty queue) and the unit tests, which pair every Bi with one W, fail.
  void Weight() {
    if (pending_weight_chunks_.empty()) return;
    operations_.push_back({OperationKind::kWeight, {}, pending_weight_chunks_.front()});
    pending_weight_chunks_.pop_front();
  }

  void ForwardBackward(int forward_phase, int backward_phase) {
    ChunkRef forward = NextForward(forward_phase);
    ChunkRef backward = NextBackward(backward_phase);
    operations_.push_back({OperationKind::kForwardBackward, forward, backward});
  }

  std::vector<Operation> Take() { return std::move(operations_); }

 private:
  ChunkRef NextForward(int phase) { return chunk_of_local_phase_(phase, next_forward_[phase]++); }
  ChunkRef NextBackward(int phase) { return chunk_of_local_phase_(phase, next_backward_[phase]++); }

  ChunkOfLocalPhase chunk_of_local_phase_;
  std::array<int, 2> next_forward_ = {0, 0};
  std::array<int, 2> next_backward_ = {0, 0};
  std::deque<ChunkRef> pending_weight_chunks_;
  std::vector<Operation> operations_;
};

// Iteration counts of the eight DualPipe phases for one rank, plus the two per-rank switches.
struct EightPhasePlan {
  std::array<int, 8> iterations;
  // h for DualPipe, r for DualPipeV: decides where phase 6 switches to input-only backwards.
  int zero_bubble_parity_index;
  // The middle ranks of DualPipe (the last rank of DualPipeV) run the first F0/B1 pair of
  // phase 4 as F then B instead of overlapped, as DeepSeek's reference schedule does. This is
  // the pair the published bubble formula leaves unoverlapped: it makes the formula exactly the
  // middle ranks' bubble (see docs/pipeline.md).
  bool first_pair_unoverlapped;
};

// The DualPipe body, written in local phases (0: the direction this rank starts with).
std::vector<Operation> BuildEightPhaseRank(const EightPhasePlan& plan,
                                           ChunkOfLocalPhase chunk_of_local_phase) {
  RankOperationBuilder rank(std::move(chunk_of_local_phase));
  const std::array<int, 8>& n = plan.iterations;
  // Phase 1: fill the pipeline from this rank's own end.
  for (int i = 0; i < n[0]; ++i) rank.Forward(0);
  // Phase 2: both directions' forwards arrive; alternate them.
  for (int i = 0; i < n[1]; ++i) {
    rank.Forward(0);
    rank.Forward(1);
  }
  // Phase 3: first backwards of direction 1, weight gradients deferred to fill bubbles.
  for (int i = 0; i < n[2]; ++i) {
    rank.Backward(1, /*input_only=*/true);
    rank.Weight();
    rank.Forward(1);
  }
  // Phase 4: the steady state, every forward overlapped with a backward of the other direction.
  for (int i = 0; i < n[3]; ++i) {
    if (i == 0 && plan.first_pair_unoverlapped) {
      rank.Forward(0);
      rank.Backward(1, /*input_only=*/false);
    } else {
      rank.ForwardBackward(0, 1);
    }
    rank.ForwardBackward(1, 0);
  }
  // Phase 5: direction 0 has no forwards left on this rank.
  for (int i = 0; i < n[4]; ++i) {
    rank.Backward(1, /*input_only=*/false);
    rank.ForwardBackward(1, 0);
  }
  // Phase 6: drain the backwards; the second half splits off weight gradients (zero bubble).
  const int switch_iteration = n[5] / 2;
  const bool parity_is_odd = plan.zero_bubble_parity_index % 2 == 1;
  bool input_only = false;
  for (int i = 0; i < n[5]; ++i) {
    if (i == switch_iteration && parity_is_odd) input_only = true;
    rank.Backward(1, input_only);
    if (i == switch_iteration && !parity_is_odd) input_only = true;
    rank.Backward(0, input_only);
  }
  // Phase 7: weight gradients fill the gaps between the last input backwards.
  for (int i = 0; i < n[6]; ++i) {
    rank.Weight();
    rank.Backward(0, /*input_only=*/true);
  }
  // Phase 8: flush the remaining weight gradients.
  for (int i = 0; i < n[7]; ++i) rank.Weight();
  return rank.Take();
}

// An empty schedule with its shape filled in; the generators add each rank's operations.
PipelineSchedule EmptySchedule(PipelineAlgorithm algorithm, int num_ranks, int num_stages,
                               int num_microbatches, int num_directions, bool forward_only) {
  PipelineSchedule schedule;
  schedule.algorithm = algorithm;
  schedule.num_ranks = num_ranks;
  schedule.num_stages = num_stages;
  schedule.num_microbatches = num_microbatches;
  schedule.num_directions = num_directions;
  schedule.forward_only = forward_only;
  return schedule;
}

// Inference runs the same order with every backward dropped; an F&B keeps its forward.
std::vector<Operation> KeepForwardsOnly(const std::vector<Operation>& operations) {
  std::vector<Operation> forwards;
  for (const Operation& operation : operations) {
    if (operation.HasForward()) {
      forwards.push_back({OperationKind::kForward, operation.forward, {}});
    }
  }
  return forwards;
}

}  // namespace

const char* PipelineAlgorithmName(PipelineAlgorithm algorithm) {
  switch (algorithm) {
    case PipelineAlgorithm::kDualPipe:
      return "dualpipe";
    case PipelineAlgorithm::kDualPipeV:
      return "dualpipev";
    case PipelineAlgorithm::kOneForwardOneBackward:
      return "1f1b";
    case PipelineAlgorithm::kZeroBubbleOneP:
      return "zb1p";
  }
  return "unknown";
}

absl::StatusOr<PipelineAlgorithm> ParsePipelineAlgorithm(std::string_view name) {
  for (PipelineAlgorithm algorithm :
       {PipelineAlgorithm::kDualPipe, PipelineAlgorithm::kDualPipeV,
        PipelineAlgorithm::kOneForwardOneBackward, PipelineAlgorithm::kZeroBubbleOneP}) {
    if (name == PipelineAlgorithmName(algorithm)) return algorithm;
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown pipeline algorithm '", std::string(name),
                                                 "'; use dualpipe, dualpipev, 1f1b or zb1p"));
}

int PipelineSchedule::RankOfStage(int direction, int stage) const {
  switch (algorithm) {
    case PipelineAlgorithm::kDualPipe:
      return direction == 0 ? stage : num_ranks - 1 - stage;
    case PipelineAlgorithm::kDualPipeV:
      return stage < num_ranks ? stage : 2 * num_ranks - 1 - stage;
    case PipelineAlgorithm::kOneForwardOneBackward:
    case PipelineAlgorithm::kZeroBubbleOneP:
      return stage;
  }
  return -1;
}

absl::StatusOr<PipelineSchedule> MakeDualPipeSchedule(int num_ranks, int num_microbatches,
                                                      bool forward_only) {
  if (absl::Status status = CheckBounds("dualpipe", num_ranks, num_microbatches); !status.ok()) {
    return status;
  }
  if (num_ranks % 2 != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "dualpipe needs an even number of ranks (rank r pairs stage r with stage R-1-r), got ",
        num_ranks, "; dualpipev accepts any rank count"));
  }
  if (num_microbatches % 2 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("dualpipe needs an even number of micro-batches (half enter at each end), "
                     "got ",
                     num_microbatches));
  }
  if (num_microbatches < 2 * num_ranks) {
    return absl::InvalidArgumentError(absl::StrCat(
        "dualpipe with ", num_ranks, " ranks needs at least ", 2 * num_ranks,
        " micro-batches (2 x ranks) to reach its steady state, got ", num_microbatches));
  }
  PipelineSchedule schedule = EmptySchedule(PipelineAlgorithm::kDualPipe, num_ranks, num_ranks,
                                            num_microbatches, 2, forward_only);
  const int half_ranks = num_ranks / 2;
  const int microbatches_per_direction = num_microbatches / 2;
  for (int rank = 0; rank < num_ranks; ++rank) {
    const int half_rank = std::min(rank, num_ranks - 1 - rank);
    const int outer = half_ranks - half_rank - 1;  // ranks between this one and its end
    EightPhasePlan plan{
        .iterations = {2 * outer, half_rank + 1, outer,
                       microbatches_per_direction - num_ranks + half_rank + 1, outer, half_rank + 1,
                       outer, half_rank + 1},
        .zero_bubble_parity_index = half_rank,
        .first_pair_unoverlapped = half_rank == half_ranks - 1,
    };
    // Ranks in the second half start with the micro-batches that enter at the last rank.
    const int direction_of_local_phase_0 = rank >= half_ranks ? 1 : 0;
    auto chunk_of_local_phase = [&](int local_phase, int microbatch) {
      const int direction = local_phase ^ direction_of_local_phase_0;
      const int stage = direction == 0 ? rank : num_ranks - 1 - rank;
      return ChunkRef{direction, microbatch, stage};
    };
    std::vector<Operation> operations = BuildEightPhaseRank(plan, chunk_of_local_phase);
    schedule.rank_operations.push_back(forward_only ? KeepForwardsOnly(operations)
                                                    : std::move(operations));
  }
  return schedule;
}

absl::StatusOr<PipelineSchedule> MakeDualPipeVSchedule(int num_ranks, int num_microbatches,
                                                       bool forward_only) {
  if (absl::Status status = CheckBounds("dualpipev", num_ranks, num_microbatches); !status.ok()) {
    return status;
  }
  if (num_microbatches < 2 * num_ranks) {
    return absl::InvalidArgumentError(absl::StrCat(
        "dualpipev with ", num_ranks, " ranks needs at least ", 2 * num_ranks,
        " micro-batches (2 x ranks) to reach its steady state, got ", num_microbatches));
  }
  PipelineSchedule schedule = EmptySchedule(PipelineAlgorithm::kDualPipeV, num_ranks, 2 * num_ranks,
                                            num_microbatches, 1, forward_only);
  for (int rank = 0; rank < num_ranks; ++rank) {
    const int outer = num_ranks - rank - 1;
    EightPhasePlan plan{
        .iterations = {2 * outer, rank + 1, outer, num_microbatches - 2 * num_ranks + rank + 1,
                       outer, rank + 1, outer, rank + 1},
        .zero_bubble_parity_index = rank,
        .first_pair_unoverlapped = rank == num_ranks - 1,
    };
    // Local phase 0 is the leg down the ranks (stage r), phase 1 the leg back (stage 2R-1-r).
    auto chunk_of_local_phase = [&](int local_phase, int microbatch) {
      const int stage = local_phase == 0 ? rank : 2 * num_ranks - 1 - rank;
      return ChunkRef{0, microbatch, stage};
    };
    std::vector<Operation> operations = BuildEightPhaseRank(plan, chunk_of_local_phase);
    schedule.rank_operations.push_back(forward_only ? KeepForwardsOnly(operations)
                                                    : std::move(operations));
  }
  return schedule;
}

absl::StatusOr<PipelineSchedule> MakeOneForwardOneBackwardSchedule(int num_ranks,
                                                                   int num_microbatches,
                                                                   bool forward_only) {
  if (absl::Status status = CheckBounds("1f1b", num_ranks, num_microbatches); !status.ok()) {
    return status;
  }
  PipelineSchedule schedule = EmptySchedule(PipelineAlgorithm::kOneForwardOneBackward, num_ranks,
                                            num_ranks, num_microbatches, 1, forward_only);
  for (int rank = 0; rank < num_ranks; ++rank) {
    std::vector<Operation> operations;
    int next_forward = 0;
    int next_backward = 0;
    auto forward = [&] {
      operations.push_back({OperationKind::kForward, {0, next_forward++, rank}, {}});
    };
    auto backward = [&] {
      operations.push_back({OperationKind::kBackward, {}, {0, next_backward++, rank}});
    };
    // Warm-up: keep R-1-r micro-batches in flight ahead of the first backward.
    const int warmup = std::min(num_ranks - 1 - rank, num_microbatches);
    for (int i = 0; i < warmup; ++i) forward();
    while (next_forward < num_microbatches) {
      forward();
      backward();
    }
    while (next_backward < num_microbatches) backward();
    schedule.rank_operations.push_back(forward_only ? KeepForwardsOnly(operations)
                                                    : std::move(operations));
  }
  return schedule;
}

absl::StatusOr<PipelineSchedule> MakeZeroBubbleOnePSchedule(int num_ranks, int num_microbatches,
                                                            bool forward_only) {
  if (absl::Status status = CheckBounds("zb1p", num_ranks, num_microbatches); !status.ok()) {
    return status;
  }
  PipelineSchedule schedule = EmptySchedule(PipelineAlgorithm::kZeroBubbleOneP, num_ranks,
                                            num_ranks, num_microbatches, 1, forward_only);
  for (int rank = 0; rank < num_ranks; ++rank) {
    RankOperationBuilder builder([rank](int, int microbatch) {
      return ChunkRef{0, microbatch, rank};
    });
    const int warmup = std::min(num_ranks - 1 - rank, num_microbatches);
    for (int i = 0; i < warmup; ++i) builder.Forward(0);
    // Rank r defers r weight gradients: with its R-1-r warm-up forwards that keeps R
    // micro-batches in flight on every rank, and the deferred W's run in the cool-down, where
    // 1F1B would idle waiting for gradients from later stages.
    const int deferred_weights = rank;
    const int steady = num_microbatches - warmup;
    for (int i = 0; i < steady; ++i) {
      builder.Forward(0);
      builder.Backward(0, /*input_only=*/true);
      if (i >= deferred_weights) builder.Weight();
    }
    for (int i = 0; i < warmup; ++i) {
      builder.Backward(0, /*input_only=*/true);
      builder.Weight();
    }
    for (int i = 0; i < std::min(deferred_weights, steady); ++i) builder.Weight();
    std::vector<Operation> operations = builder.Take();
    schedule.rank_operations.push_back(forward_only ? KeepForwardsOnly(operations)
                                                    : std::move(operations));
  }
  return schedule;
}

absl::StatusOr<PipelineSchedule> MakePipelineSchedule(PipelineAlgorithm algorithm, int num_ranks,
                                                      int num_microbatches, bool forward_only) {
  switch (algorithm) {
    case PipelineAlgorithm::kDualPipe:
      return MakeDualPipeSchedule(num_ranks, num_microbatches, forward_only);
    case PipelineAlgorithm::kDualPipeV:
      return MakeDualPipeVSchedule(num_ranks, num_microbatches, forward_only);
    case PipelineAlgorithm::kOneForwardOneBackward:
      return MakeOneForwardOneBackwardSchedule(num_ranks, num_microbatches, forward_only);
    case PipelineAlgorithm::kZeroBubbleOneP:
      return MakeZeroBubbleOnePSchedule(num_ranks, num_microbatches, forward_only);
  }
  return absl::InvalidArgumentError("unknown pipeline algorithm");
}

namespace {

// DualPipeV has one direction; its label shows the leg instead, so the text reads like DualPipe.
int DirectionLabel(const PipelineSchedule& schedule, const ChunkRef& chunk) {
  if (schedule.algorithm == PipelineAlgorithm::kDualPipeV) {
    return chunk.stage < schedule.num_ranks ? 0 : 1;
  }
  return chunk.direction;
}

std::string ChunkLabel(const PipelineSchedule& schedule, const ChunkRef& chunk) {
  return absl::StrCat(DirectionLabel(schedule, chunk), ".", chunk.microbatch);
}

}  // namespace

std::string FormatOperation(const PipelineSchedule& schedule, const Operation& operation) {
  switch (operation.kind) {
    case OperationKind::kForward:
      return absl::StrCat("F", ChunkLabel(schedule, operation.forward));
    case OperationKind::kBackward:
      return absl::StrCat("B", ChunkLabel(schedule, operation.backward));
    case OperationKind::kBackwardInput:
      return absl::StrCat("B", ChunkLabel(schedule, operation.backward), "i");
    case OperationKind::kWeight:
      return absl::StrCat("W", ChunkLabel(schedule, operation.backward));
    case OperationKind::kForwardBackward:
      return absl::StrCat("[F", ChunkLabel(schedule, operation.forward), "|B",
                          ChunkLabel(schedule, operation.backward), "]");
  }
  return "?";
}

std::string FormatRankSchedule(const PipelineSchedule& schedule, int rank) {
  return absl::StrCat("rank ", rank, ": ",
                      absl::StrJoin(schedule.rank_operations[rank], " ",
                                    [&](std::string* out, const Operation& operation) {
                                      out->append(FormatOperation(schedule, operation));
                                    }));
}

}  // namespace moeserve::engine::pipeline
