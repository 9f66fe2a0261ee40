// Chrome trace (trace-event JSON) of a simulated pipeline timeline, one lane per rank, for
// Perfetto (ui.perfetto.dev) or chrome://tracing.
//
// Owns the mapping from simulated operations to trace events: complete ("X") events with
// pid/tid/ts/dur, plus process_name/thread_name metadata so lanes read "rank 0", "rank 1", ...
// One simulated time unit becomes one millisecond of trace time. Callers: the
// `moeserve plan pipeline --trace` command and tests.
//
// Thread-safety: pure functions; WritePipelineTrace writes only the file it is given.
#pragma once

#include <string>

#include "absl/status/status.h"
#include "engine/pipeline/schedule.h"
#include "engine/pipeline/simulator.h"
#include "nlohmann/json.hpp"

namespace moeserve::engine::pipeline {

// Microseconds of trace time per simulated time unit.
inline constexpr double kTraceMicrosecondsPerTimeUnit = 1000.0;

nlohmann::json BuildPipelineTrace(const PipelineSchedule& schedule,
                                  const OperationDurations& durations,
                                  const SimulationResult& simulation);

// Writes BuildPipelineTrace's JSON to `path`. Returns Unavailable, naming the path, when the file
// cannot be written.
absl::Status WritePipelineTrace(const std::string& path, const PipelineSchedule& schedule,
                                const OperationDurations& durations,
                                const SimulationResult& simulation);

}  // namespace moeserve::engine::pipeline
