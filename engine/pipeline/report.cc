#include "engine/pipeline/report.h"

#include <algorithm>
#include <optional>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace moeserve::engine::pipeline {

double OneForwardOneBackwardBubble(int num_stages, const OperationDurations& durations) {
  return (num_stages - 1) * (durations.forward + durations.backward);
}

double ZeroBubbleOnePBubble(int num_stages, const OperationDurations& durations) {
  return (num_stages - 1) * (durations.forward + durations.backward - 2 * durations.weight);
}

double DualPipeBubble(int num_stages, const OperationDurations& durations) {
  return (num_stages / 2 - 1) *
         (durations.forward_backward + durations.backward - 3 * durations.weight);
}

std::string FormatScheduleSection(const PipelineSchedule& schedule) {
  std::string text = absl::StrCat("schedule: ", PipelineAlgorithmName(schedule.algorithm), ", ",
                                  schedule.num_ranks, " ranks, ", schedule.num_stages, " stages, ",
                                  schedule.num_microbatches, " chunks",
                                  schedule.forward_only ? ", forward only" : "", "\n");
  for (int rank = 0; rank < schedule.num_ranks; ++rank) {
    absl::StrAppend(&text, FormatRankSchedule(schedule, rank), "\n");
  }
  return text;
}

std::string FormatRankTableSection(const PipelineSchedule& schedule,
                                   const OperationDurations& durations,
                                   const SimulationResult& simulation) {
  std::string text = absl::StrFormat("timeline: makespan %g at %s\n", simulation.makespan,
                                     FormatOperationDurations(durations));
  absl::StrAppendFormat(&text, "%6s %10s %10s %10s %17s %6s\n", "rank", "finish", "busy", "bubble",
                        "peak_activations", "F&B");
  for (int rank = 0; rank < schedule.num_ranks; ++rank) {
    const RankTimeline& timeline = simulation.ranks[rank];
    absl::StrAppendFormat(&text, "%6d %10g %10g %10g %17d %6d\n", rank, timeline.finish,
                          timeline.busy, timeline.bubble, timeline.peak_activations,
                          timeline.forward_backward_count);
  }
  return text;
}

namespace {

// Largest per-rank bubble of `algorithm` in training mode, or nullopt when the arguments do not
// fit it (for example odd ranks for DualPipe).
std::optional<double> SimulatedWorstBubble(PipelineAlgorithm algorithm, int num_ranks,
                                           int num_microbatches,
                                           const OperationDurations& durations) {
  absl::StatusOr<PipelineSchedule> schedule =
      MakePipelineSchedule(algorithm, num_ranks, num_microbatches, /*forward_only=*/false);
  if (!schedule.ok()) return std::nullopt;
  absl::StatusOr<SimulationResult> simulation = SimulatePipeline(*schedule, durations);
  if (!simulation.ok()) return std::nullopt;
  double worst = 0;
  for (const RankTimeline& timeline : simulation->ranks) worst = std::max(worst, timeline.bubble);
  return worst;
}

std::string OptionalNumber(std::optional<double> value) {
  return value.has_value() ? absl::StrFormat("%g", *value) : "n/a";
}

}  // namespace

std::string FormatCostTableSection(int num_ranks, int num_microbatches,
                                   const OperationDurations& durations) {
  struct Row {
    const char* method;
    int num_stages;
    const char* formula;
    double formula_bubble;
    std::optional<double> simulated_bubble;
    const char* parameters;
    const char* activations_formula;
    int activations;
  };
  const int stages = num_ranks;
  const int dualpipev_stages = 2 * num_ranks;
  const Row rows[] = {
      {"1f1b", stages, "(PP-1)(F+B)", OneForwardOneBackwardBubble(stages, durations),
       SimulatedWorstBubble(PipelineAlgorithm::kOneForwardOneBackward, num_ranks, num_microbatches,
                            durations),
       "1x", "PP", stages},
      {"zb1p", stages, "(PP-1)(F+B-2W)", ZeroBubbleOnePBubble(stages, durations),
       SimulatedWorstBubble(PipelineAlgorithm::kZeroBubbleOneP, num_ranks, num_microbatches,
                            durations),
       "1x", "PP", stages},
      {"dualpipe", stages, "(PP/2-1)(F&B+B-3W)", DualPipeBubble(stages, durations),
       SimulatedWorstBubble(PipelineAlgorithm::kDualPipe, num_ranks, num_microbatches, durations),
       "2x", "PP+1", stages + 1},
      {"dualpipev", dualpipev_stages, "(PP/2-1)(F&B+B-3W)",
       DualPipeBubble(dualpipev_stages, durations),
       SimulatedWorstBubble(PipelineAlgorithm::kDualPipeV, num_ranks, num_microbatches, durations),
       "2x", "PP+1", dualpipev_stages + 1},
  };
  std::string text =
      absl::StrFormat("costs: %d ranks, %d chunks, %s (training; per rank)\n", num_ranks,
                      num_microbatches, FormatOperationDurations(durations));
  absl::StrAppendFormat(&text, "%-10s %4s %-20s %10s %10s %10s %12s\n", "method", "PP",
                        "bubble_formula", "bubble", "simulated", "parameters", "activations");
  for (const Row& row : rows) {
    absl::StrAppendFormat(&text, "%-10s %4d %-20s %10g %10s %10s %12s\n", row.method,
                          row.num_stages, row.formula, row.formula_bubble,
                          OptionalNumber(row.simulated_bubble), row.parameters,
                          absl::StrCat(row.activations_formula, "=", row.activations));
  }
  absl::StrAppend(
      &text,
      "PP = pipeline stages; dualpipev runs 2 stages per rank, so its stages (and F, B, W) are\n"
      "half the size of the others' for the same model. parameters: stage weights held per\n"
      "rank (dualpipe keeps two copies of every stage); activations: one micro-batch at one\n"
      "stage. simulated: largest per-rank bubble this tool finds for the same ranks and chunks\n"
      "(n/a: the arguments do not fit that algorithm).\n");
  return text;
}

}  // namespace moeserve::engine::pipeline
