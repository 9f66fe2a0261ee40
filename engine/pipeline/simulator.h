// Timing simulator for pipeline schedules: runs every rank's operations in order, each starting
// when its rank is free and its inputs (activations from the previous stage, gradients from the
// next) have arrived, and reports the timeline, makespan, per-rank bubble and peak activations.
//
// Owns the timing model (OperationDurations) and the parser of its text form (`F=1,B=2,W=1,FB=3`).
// Callers: the `moeserve plan pipeline` command, the Chrome-trace writer and tests.
//
// Thread-safety: pure functions of their arguments; safe to call concurrently.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/pipeline/schedule.h"

namespace moeserve::engine::pipeline {

// Durations in any one time unit. An input-only backward (Bi) takes `backward - weight`; the
// defaults are the unit costs under which the published bubble formulas are usually quoted.
struct OperationDurations {
  double forward = 1;
  double backward = 2;          // full backward: input and weight gradients
  double weight = 1;            // weight-gradient part of a backward (W)
  double forward_backward = 3;  // one forward overlapped with one full backward (F&B)
  // Added to every dependency that crosses ranks (activation or gradient send).
  double point_to_point_latency = 0;

  double BackwardInput() const { return backward - weight; }
  double DurationOf(OperationKind kind) const;
};

// Parses `F=1,B=2,W=1,FB=3` (keys F, B, W, FB or F&B, and P2P for the point-to-point latency;
// any subset, the rest keep their defaults) and validates the result.
absl::StatusOr<OperationDurations> ParseOperationDurations(std::string_view text);
absl::Status ValidateOperationDurations(const OperationDurations& durations);
// The text form ParseOperationDurations accepts, e.g. `F=1,B=2,W=1,FB=3,P2P=0`.
std::string FormatOperationDurations(const OperationDurations& durations);

struct TimedOperation {
  Operation operation;
  double start = 0;
  double end = 0;
};

struct RankTimeline {
  std::vector<TimedOperation> operations;
  double finish = 0;  // end of the rank's last operation
  double busy = 0;    // sum of its operations' durations
  double bubble = 0;  // makespan - busy: time the rank idles within the whole step
  // Most micro-batch activations held at once: a forward stores one, the backward that completes
  // its gradients (a full B, or the W after a Bi) frees it; inside an F&B the forward's activation
  // is stored before the backward's is freed. Zero in forward-only mode (nothing is kept).
  int peak_activations = 0;
  int forward_backward_count = 0;
};

struct SimulationResult {
  double makespan = 0;  // end of the last operation on any rank; every rank starts at 0
  std::vector<RankTimeline> ranks;
};

// Simulates `schedule`. Returns InvalidArgument when the schedule is malformed (a chunk on the
// wrong rank, run twice, or a W without its Bi) and FailedPrecondition when it deadlocks (every
// unfinished rank waits for data that no rank will produce), naming where each rank is stuck.
absl::StatusOr<SimulationResult> SimulatePipeline(const PipelineSchedule& schedule,
                                                  const OperationDurations& durations);

}  // namespace moeserve::engine::pipeline
