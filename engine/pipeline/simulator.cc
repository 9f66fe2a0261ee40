#include "engine/pipeline/simulator.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <optional>
#include <set>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"

namespace moeserve::engine::pipeline {

double OperationDurations::DurationOf(OperationKind kind) const {
  switch (kind) {
    case OperationKind::kForward:
      return forward;
    case OperationKind::kBackward:
      return backward;
    case OperationKind::kBackwardInput:
      return BackwardInput();
    case OperationKind::kWeight:
      return weight;
    case OperationKind::kForwardBackward:
      return forward_backward;
  }
  return 0;
}

absl::Status ValidateOperationDurations(const OperationDurations& durations) {
  const std::pair<const char*, double> named[] = {
      {"F", durations.forward},
      {"B", durations.backward},
      {"W", durations.weight},
      {"FB", durations.forward_backward},
      {"P2P", durations.point_to_point_latency},
  };
  for (const auto& [name, value] : named) {
    if (!std::isfinite(value) || value < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("--times: ", name, " must be a finite number >= 0, got ", value));
    }
  }
  if (durations.forward <= 0 || durations.backward <= 0 || durations.forward_backward <= 0) {
    return absl::InvalidArgumentError("--times: F, B and FB must be greater than 0");
  }
  if (durations.weight >= durations.backward) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--times: W (the weight-gradient part of a backward) must be shorter than the full "
        "backward B, got W=",
        durations.weight, " B=", durations.backward));
  }
  return absl::OkStatus();
}

absl::StatusOr<OperationDurations> ParseOperationDurations(std::string_view text) {
  OperationDurations durations;
  std::set<std::string> seen_keys;
  // This Abseil build's string_view is its own type, not std::string_view.
  const absl::string_view input(text.data(), text.size());
  for (absl::string_view item : absl::StrSplit(input, ',', absl::SkipWhitespace())) {
    std::pair<absl::string_view, absl::string_view> key_value = absl::StrSplit(item, '=');
    std::string key = absl::AsciiStrToUpper(absl::StripAsciiWhitespace(key_value.first));
    double value = 0;
    if (!absl::SimpleAtod(absl::StripAsciiWhitespace(key_value.second), &value)) {
      return absl::InvalidArgumentError(
          absl::StrCat("--times: '", item, "' is not KEY=NUMBER (example: F=1,B=2,W=1,FB=3)"));
    }
    if (key == "F&B") key = "FB";
    if (!seen_keys.insert(key).second) {
      return absl::InvalidArgumentError(absl::StrCat("--times: ", key, " is given twice"));
    }
    if (key == "F") {
      durations.forward = value;
    } else if (key == "B") {
      durations.backward = value;
    } else if (key == "W") {
      durations.weight = value;
    } else if (key == "FB") {
      durations.forward_backward = value;
    } else if (key == "P2P") {
      durations.point_to_point_latency = value;
    } else {
      return absl::InvalidArgumentError(absl::StrCat("--times: unknown key '", key_value.first,
                                                     "'; use F, B, W, FB (or F&B) and P2P"));
    }
  }
  if (seen_keys.empty()) {
    return absl::InvalidArgumentError("--times is empty; example: F=1,B=2,W=1,FB=3");
  }
  if (absl::Status status = ValidateOperationDurations(durations); !status.ok()) return status;
  return durations;
}

std::string FormatOperationDurations(const OperationDurations& durations) {
  return absl::StrFormat("F=%g,B=%g,W=%g,FB=%g,P2P=%g", durations.forward, durations.backward,
                         durations.weight, durations.forward_backward,
                         durations.point_to_point_latency);
}

namespace {

constexpr double kNotYet = -1;  // simulated times are never negative

// One slot per (direction, micro-batch, stage): when its forward output, or its input gradient,
// became available on the rank that produced it.
class ChunkTimes {
 public:
  explicit ChunkTimes(const PipelineSchedule& schedule)
      : num_stages_(schedule.num_stages),
        microbatches_per_direction_(schedule.MicrobatchesPerDirection()),
        times_(static_cast<size_t>(schedule.num_directions) * microbatches_per_direction_ *
                   num_stages_,
               kNotYet) {}

  double& operator[](const ChunkRef& chunk) {
    return times_[(static_cast<size_t>(chunk.direction) * microbatches_per_direction_ +
                   chunk.microbatch) *
                      num_stages_ +
                  chunk.stage];
  }

 private:
  int num_stages_;
  int microbatches_per_direction_;
  std::vector<double> times_;
};

bool InRange(const PipelineSchedule& schedule, const ChunkRef& chunk) {
  return chunk.direction >= 0 && chunk.direction < schedule.num_directions &&
         chunk.microbatch >= 0 && chunk.microbatch < schedule.MicrobatchesPerDirection() &&
         chunk.stage >= 0 && chunk.stage < schedule.num_stages;
}

// Checks what the timing loop relies on: every chunk exists and lives on the rank that runs it,
// no forward or input backward runs twice, and each W follows a Bi of its chunk on the same rank.
absl::Status CheckWellFormed(const PipelineSchedule& schedule) {
  if (schedule.num_ranks < 1 || schedule.num_stages < 1 || schedule.num_directions < 1 ||
      schedule.MicrobatchesPerDirection() < 1 ||
      static_cast<int>(schedule.rank_operations.size()) != schedule.num_ranks) {
    return absl::InvalidArgumentError("pipeline schedule has an inconsistent shape");
  }
  ChunkTimes forward_seen(schedule);
  ChunkTimes backward_seen(schedule);
  for (int rank = 0; rank < schedule.num_ranks; ++rank) {
    std::vector<ChunkRef> pending_weight_chunks;
    const std::vector<Operation>& operations = schedule.rank_operations[rank];
    for (size_t index = 0; index < operations.size(); ++index) {
      const Operation& operation = operations[index];
      auto where = [&] {
        return absl::StrCat("rank ", rank, " operation ", index, " (",
                            FormatOperation(schedule, operation), ")");
      };
      std::vector<ChunkRef> chunks;
      if (operation.HasForward()) chunks.push_back(operation.forward);
      if (operation.kind != OperationKind::kForward) chunks.push_back(operation.backward);
      for (const ChunkRef& chunk : chunks) {
        if (!InRange(schedule, chunk)) {
          return absl::InvalidArgumentError(absl::StrCat(where(), " names a chunk out of range"));
        }
        if (schedule.RankOfStage(chunk.direction, chunk.stage) != rank) {
          return absl::InvalidArgumentError(absl::StrCat(
              where(), " runs stage ", chunk.stage, " of direction ", chunk.direction,
              ", which belongs to rank ", schedule.RankOfStage(chunk.direction, chunk.stage)));
        }
      }
      if (operation.HasForward()) {
        double& seen = forward_seen[operation.forward];
        if (seen != kNotYet) {
          return absl::InvalidArgumentError(absl::StrCat(where(), " repeats a forward"));
        }
        seen = 0;
      }
      if (operation.HasInputBackward()) {
        double& seen = backward_seen[operation.backward];
        if (seen != kNotYet) {
          return absl::InvalidArgumentError(absl::StrCat(where(), " repeats a backward"));
        }
        seen = 0;
      }
      if (operation.kind == OperationKind::kBackwardInput) {
        pending_weight_chunks.push_back(operation.backward);
      }
      if (operation.kind == OperationKind::kWeight) {
        auto pending = std::find(pending_weight_chunks.begin(), pending_weight_chunks.end(),
                                 operation.backward);
        if (pending == pending_weight_chunks.end()) {
          return absl::InvalidArgumentError(
              absl::StrCat(where(), " has no earlier input-only backward of its chunk"));
        }
        pending_weight_chunks.erase(pending);
      }
    }
  }
  return absl::OkStatus();
}

class Simulation {
 public:
  Simulation(const PipelineSchedule& schedule, const OperationDurations& durations)
      : schedule_(schedule),
        durations_(durations),
        forward_done_(schedule),
        input_gradient_done_(schedule) {}

  absl::StatusOr<SimulationResult> Run() {
    const int num_ranks = schedule_.num_ranks;
    std::vector<size_t> next_operation(num_ranks, 0);
    std::vector<int> activations_held(num_ranks, 0);
    SimulationResult result;
    result.ranks.resize(num_ranks);
    // Each sweep runs, on every rank, all operations whose inputs already exist. An operation's
    // start time depends only on its rank's previous operation and its inputs' times, never on
    // the order ranks are visited, so sweeping until nothing moves gives the exact timeline.
    bool progressed = true;
    while (progressed) {
      progressed = false;
      for (int rank = 0; rank < num_ranks; ++rank) {
        const std::vector<Operation>& operations = schedule_.rank_operations[rank];
        RankTimeline& timeline = result.ranks[rank];
        while (next_operation[rank] < operations.size()) {
          const Operation& operation = operations[next_operation[rank]];
          std::optional<double> inputs_ready = InputsReady(operation, rank);
          if (!inputs_ready.has_value()) break;
          const double start = std::max(timeline.finish, *inputs_ready);
          const double end = start + durations_.DurationOf(operation.kind);
          if (operation.HasForward()) forward_done_[operation.forward] = end;
          if (operation.HasInputBackward()) input_gradient_done_[operation.backward] = end;
          timeline.operations.push_back({operation, start, end});
          timeline.finish = end;
          timeline.busy += end - start;
          if (operation.kind == OperationKind::kForwardBackward) ++timeline.forward_backward_count;
          if (!schedule_.forward_only) {
            int& held = activations_held[rank];
            if (operation.HasForward()) ++held;
            timeline.peak_activations = std::max(timeline.peak_activations, held);
            if (operation.kind == OperationKind::kBackward ||
                operation.kind == OperationKind::kForwardBackward ||
                operation.kind == OperationKind::kWeight) {
              --held;
            }
          }
          ++next_operation[rank];
          progressed = true;
        }
      }
    }
    std::vector<std::string> stuck;
    for (int rank = 0; rank < num_ranks; ++rank) {
      const std::vector<Operation>& operations = schedule_.rank_operations[rank];
      if (next_operation[rank] < operations.size()) {
        stuck.push_back(DescribeWait(operations[next_operation[rank]], rank, next_operation[rank]));
      }
    }
    if (!stuck.empty()) {
      return absl::FailedPreconditionError(
          absl::StrCat("pipeline schedule deadlocks: ", absl::StrJoin(stuck, "; ")));
    }
    for (const RankTimeline& timeline : result.ranks) {
      result.makespan = std::max(result.makespan, timeline.finish);
    }
    for (RankTimeline& timeline : result.ranks) timeline.bubble = result.makespan - timeline.busy;
    return result;
  }

 private:
  // When data produced by `chunk`'s stage on its own rank reaches `rank`.
  double Arrival(double produced_at, const ChunkRef& chunk, int rank) const {
    const bool crosses_ranks = schedule_.RankOfStage(chunk.direction, chunk.stage) != rank;
    return produced_at + (crosses_ranks ? durations_.point_to_point_latency : 0);
  }

  // The forward input: the previous stage's output (stage 0 reads the batch: always ready).
  std::optional<double> ForwardInputReady(const ChunkRef& chunk, int rank) {
    if (chunk.stage == 0) return 0.0;
    const ChunkRef previous{chunk.direction, chunk.microbatch, chunk.stage - 1};
    const double produced = forward_done_[previous];
    if (produced == kNotYet) return std::nullopt;
    return Arrival(produced, previous, rank);
  }

  // The backward input: this stage's own forward, and the next stage's input gradient (the last
  // stage starts the backward from its own loss).
  std::optional<double> BackwardInputReady(const ChunkRef& chunk, int rank) {
    const double own_forward = forward_done_[chunk];
    if (own_forward == kNotYet) return std::nullopt;
    if (chunk.stage == schedule_.num_stages - 1) return own_forward;
    const ChunkRef next{chunk.direction, chunk.microbatch, chunk.stage + 1};
    const double produced = input_gradient_done_[next];
    if (produced == kNotYet) return std::nullopt;
    return std::max(own_forward, Arrival(produced, next, rank));
  }

  std::optional<double> InputsReady(const Operation& operation, int rank) {
    double ready = 0;
    if (operation.HasForward()) {
      std::optional<double> forward_ready = ForwardInputReady(operation.forward, rank);
      if (!forward_ready.has_value()) return std::nullopt;
      ready = std::max(ready, *forward_ready);
    }
    if (operation.HasInputBackward()) {
      std::optional<double> backward_ready = BackwardInputReady(operation.backward, rank);
      if (!backward_ready.has_value()) return std::nullopt;
      ready = std::max(ready, *backward_ready);
    }
    // A W needs only its own Bi, which CheckWellFormed placed earlier on the same rank.
    return ready;
  }

  std::string DescribeWait(const Operation& operation, int rank, size_t index) {
    std::string missing;
    if (operation.HasForward() && !ForwardInputReady(operation.forward, rank).has_value()) {
      missing = absl::StrCat("the activation of stage ", operation.forward.stage - 1);
    } else if (operation.HasInputBackward()) {
      missing = forward_done_[operation.backward] == kNotYet
                    ? absl::StrCat("its own forward at stage ", operation.backward.stage)
                    : absl::StrCat("the gradient of stage ", operation.backward.stage + 1);
    }
    return absl::StrCat("rank ", rank, " at operation ", index, " (",
                        FormatOperation(schedule_, operation), ") waits for ", missing);
  }

  const PipelineSchedule& schedule_;
  const OperationDurations& durations_;
  ChunkTimes forward_done_;
  ChunkTimes input_gradient_done_;
};

}  // namespace

absl::StatusOr<SimulationResult> SimulatePipeline(const PipelineSchedule& schedule,
                                                  const OperationDurations& durations) {
  if (absl::Status status = ValidateOperationDurations(durations); !status.ok()) return status;
  if (absl::Status status = CheckWellFormed(schedule); !status.ok()) return status;
  return Simulation(schedule, durations).Run();
}

}  // namespace moeserve::engine::pipeline
