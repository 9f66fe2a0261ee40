#include "engine/pipeline/chrome_trace.h"

#include <cerrno>
#include <cstring>
#include <fstream>

#include "absl/strings/str_cat.h"

namespace moeserve::engine::pipeline {
namespace {

// The trace's process id; a plan is one "process" whose threads are the ranks.
constexpr int kTraceProcessId = 0;

const char* CategoryOf(OperationKind kind) {
  switch (kind) {
    case OperationKind::kForward:
      return "forward";
    case OperationKind::kBackward:
      return "backward";
    case OperationKind::kBackwardInput:
      return "backward_input";
    case OperationKind::kWeight:
      return "weight";
    case OperationKind::kForwardBackward:
      return "forward_backward";
  }
  return "unknown";
}

nlohmann::json ChunkArgs(const ChunkRef& chunk) {
  return {{"direction", chunk.direction}, {"microbatch", chunk.microbatch}, {"stage", chunk.stage}};
}

}  // namespace

nlohmann::json BuildPipelineTrace(const PipelineSchedule& schedule,
                                  const OperationDurations& durations,
                                  const SimulationResult& simulation) {
  const std::string process_name = absl::StrCat(
      "pipeline ", PipelineAlgorithmName(schedule.algorithm), " ranks=", schedule.num_ranks,
      " chunks=", schedule.num_microbatches, schedule.forward_only ? " forward-only" : "");
  nlohmann::json events = nlohmann::json::array();
  events.push_back({{"name", "process_name"},
                    {"ph", "M"},
                    {"pid", kTraceProcessId},
                    {"tid", 0},
                    {"args", {{"name", process_name}}}});
  for (int rank = 0; rank < static_cast<int>(simulation.ranks.size()); ++rank) {
    events.push_back({{"name", "thread_name"},
                      {"ph", "M"},
                      {"pid", kTraceProcessId},
                      {"tid", rank},
                      {"args", {{"name", absl::StrCat("rank ", rank)}}}});
    // Without a sort index viewers order lanes by name, which puts "rank 10" before "rank 2".
    events.push_back({{"name", "thread_sort_index"},
                      {"ph", "M"},
                      {"pid", kTraceProcessId},
                      {"tid", rank},
                      {"args", {{"sort_index", rank}}}});
  }
  for (int rank = 0; rank < static_cast<int>(simulation.ranks.size()); ++rank) {
    for (const TimedOperation& timed : simulation.ranks[rank].operations) {
      const Operation& operation = timed.operation;
      nlohmann::json args = nlohmann::json::object();
      if (operation.HasForward()) args["forward"] = ChunkArgs(operation.forward);
      if (operation.kind != OperationKind::kForward)
        args["backward"] = ChunkArgs(operation.backward);
      events.push_back({{"name", FormatOperation(schedule, operation)},
                        {"cat", CategoryOf(operation.kind)},
                        {"ph", "X"},
                        {"pid", kTraceProcessId},
                        {"tid", rank},
                        {"ts", timed.start * kTraceMicrosecondsPerTimeUnit},
                        {"dur", (timed.end - timed.start) * kTraceMicrosecondsPerTimeUnit},
                        {"args", std::move(args)}});
    }
  }
  return {{"traceEvents", std::move(events)},
          {"displayTimeUnit", "ms"},
          {"otherData",
           {{"algorithm", PipelineAlgorithmName(schedule.algorithm)},
            {"ranks", schedule.num_ranks},
            {"chunks", schedule.num_microbatches},
            {"forward_only", schedule.forward_only},
            {"times", FormatOperationDurations(durations)},
            {"time_unit", "1 simulated unit = 1 ms"},
            {"makespan", simulation.makespan}}}};
}

absl::Status WritePipelineTrace(const std::string& path, const PipelineSchedule& schedule,
                                const OperationDurations& durations,
                                const SimulationResult& simulation) {
  std::ofstream file(path, std::ios::out | std::ios::trunc);
  if (!file) {
    return absl::UnavailableError(
        absl::StrCat("cannot open trace file '", path, "' for writing: ", std::strerror(errno)));
  }
  file << BuildPipelineTrace(schedule, durations, simulation).dump() << '\n';
  file.close();
  if (!file) {
    return absl::UnavailableError(absl::StrCat("writing trace file '", path, "' failed"));
  }
  return absl::OkStatus();
}

}  // namespace moeserve::engine::pipeline
