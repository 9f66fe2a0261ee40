#include "engine/pipeline/plan_command.h"

#include <iostream>
#include <memory>
#include <sstream>

#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "engine/pipeline/chrome_trace.h"
#include "engine/pipeline/report.h"
#include "engine/pipeline/schedule.h"
#include "engine/pipeline/simulator.h"

namespace moeserve::engine::pipeline {
namespace {

absl::StatusOr<int> ParsePositiveInteger(const std::string& option, const std::string& text) {
  if (text.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(option, " is required"));
  }
  int value = 0;
  if (!absl::SimpleAtoi(text, &value) || value < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(option, " must be a positive integer, got '", text, "'"));
  }
  return value;
}

}  // namespace

absl::Status RunPlanPipeline(const PlanPipelineOptions& options, std::ostream& out) {
  if (options.algorithm.empty()) {
    return absl::InvalidArgumentError("--algo is required: dualpipe, dualpipev, 1f1b or zb1p");
  }
  absl::StatusOr<PipelineAlgorithm> algorithm = ParsePipelineAlgorithm(options.algorithm);
  if (!algorithm.ok()) return algorithm.status();
  absl::StatusOr<int> num_ranks = ParsePositiveInteger("--ranks", options.ranks);
  if (!num_ranks.ok()) return num_ranks.status();
  absl::StatusOr<int> num_microbatches = ParsePositiveInteger("--chunks", options.chunks);
  if (!num_microbatches.ok()) return num_microbatches.status();
  absl::StatusOr<OperationDurations> durations = ParseOperationDurations(options.times);
  if (!durations.ok()) return durations.status();
  absl::StatusOr<PipelineSchedule> schedule =
      MakePipelineSchedule(*algorithm, *num_ranks, *num_microbatches, options.forward_only);
  if (!schedule.ok()) return schedule.status();

  absl::StatusOr<SimulationResult> simulation = SimulatePipeline(*schedule, *durations);
  if (!simulation.ok()) {
    // The generators never deadlock (tests check it); surface it as an internal error if one does.
    return absl::InternalError(simulation.status().message());
  }
  if (!options.trace_path.empty()) {
    if (absl::Status status =
            WritePipelineTrace(options.trace_path, *schedule, *durations, *simulation);
        !status.ok()) {
      return status;
    }
  }
  out << FormatScheduleSection(*schedule) << "\n"
      << FormatRankTableSection(*schedule, *durations, *simulation) << "\n"
      << FormatCostTableSection(*num_ranks, *num_microbatches, *durations);
  if (!options.trace_path.empty()) {
    out << "\ntrace: wrote " << options.trace_path
        << " (open it in https://ui.perfetto.dev or chrome://tracing)\n";
  }
  return absl::OkStatus();
}

void RegisterPlanPipelineCommand(CLI::App& plan_command, int& exit_code) {
  // The callback runs after parsing, so the options must outlive this function.
  auto options = std::make_shared<PlanPipelineOptions>();
  CLI::App* pipeline = plan_command.add_subcommand(
      "pipeline",
      "Show a pipeline-parallel schedule (DualPipe, DualPipeV, 1F1B, ZB1P): each rank's "
      "operations, the simulated bubble and memory per rank, and the algorithms' costs");
  pipeline->add_option("--algo", options->algorithm, "Schedule: dualpipe, dualpipev, 1f1b or zb1p")
      ->type_name("ALGO");
  pipeline->add_option("--ranks", options->ranks, "Pipeline ranks R (dualpipe: even)")
      ->type_name("R");
  pipeline
      ->add_option("--chunks", options->chunks,
                   "Micro-batches N per step (dualpipe: even and >= 2R; dualpipev: >= 2R)")
      ->type_name("N");
  pipeline->add_flag("--forward-only", options->forward_only,
                     "Inference: drop every backward, keep the forward order");
  pipeline
      ->add_option("--times", options->times,
                   "Operation durations: F forward, B full backward, W its weight part, FB an "
                   "overlapped F&B pair, optional P2P latency (default F=1,B=2,W=1,FB=3,P2P=0)")
      ->type_name("F=..,B=..,W=..,FB=..");
  pipeline
      ->add_option("--trace", options->trace_path,
                   "Write a Chrome trace of the simulated timeline (Perfetto)")
      ->type_name("FILE.json");
  pipeline->callback([options, &exit_code] {
    std::ostringstream report;
    absl::Status status = RunPlanPipeline(*options, report);
    if (status.ok()) {
      std::cout << report.str() << std::flush;
      return;
    }
    std::cerr << "moeserve plan pipeline: " << status.message() << "\n";
    if (absl::IsInvalidArgument(status)) {
      std::cerr << "run 'moeserve plan pipeline --help' for the options\n";
      exit_code = 2;
    } else {
      exit_code = 1;
    }
  });
}

}  // namespace moeserve::engine::pipeline
