// Text reports of a pipeline plan: the per-rank schedule lines, the per-rank timing table and the
// table comparing the algorithms' bubble, parameter and activation costs.
//
// Owns the wording and layout of `moeserve plan pipeline`'s output (docs/pipeline.md shows it;
// tests check it). Callers: plan_command.cc and tests.
//
// Thread-safety: pure functions; safe to call concurrently.
#pragma once

#include <string>

#include "engine/pipeline/schedule.h"
#include "engine/pipeline/simulator.h"

namespace moeserve::engine::pipeline {

// A heading line, then one `rank r: ...` line per rank.
std::string FormatScheduleSection(const PipelineSchedule& schedule);

// The makespan, then one row per rank: finish time, busy time, bubble, peak activations and
// the number of overlapped F&B pairs.
std::string FormatRankTableSection(const PipelineSchedule& schedule,
                                   const OperationDurations& durations,
                                   const SimulationResult& simulation);

// The published bubble / parameter / activation costs of 1F1B, ZB1P, DualPipe and DualPipeV for
// `num_ranks` ranks, evaluated at `durations`, next to the largest per-rank bubble this simulator
// finds for the same ranks and `num_microbatches` (n/a where the arguments don't fit).
std::string FormatCostTableSection(int num_ranks, int num_microbatches,
                                   const OperationDurations& durations);

// The published bubble formulas, with PP the number of pipeline stages.
double OneForwardOneBackwardBubble(int num_stages, const OperationDurations& durations);
double ZeroBubbleOnePBubble(int num_stages, const OperationDurations& durations);
double DualPipeBubble(int num_stages, const OperationDurations& durations);

}  // namespace moeserve::engine::pipeline
