// `moeserve plan pipeline`: prints the per-rank schedule of DualPipe, DualPipeV, 1F1B or ZB1P, the
// simulated per-rank timing table and the algorithms' cost table, and optionally writes a Chrome
// trace of the simulated timeline.
//
// Owns the command's options, their validation and its exit codes (0 ok, 2 bad arguments, 1 any
// other failure such as an unwritable trace file). Callers: the `moeserve` main binary, which
// registers the command under its `plan` subcommand, the `moeserve-plan` test driver, and tests
// (through RunPlanPipeline).
//
// Thread-safety: RegisterPlanPipelineCommand and the callback it installs run on the thread that
// parses the command line; RunPlanPipeline is safe to call concurrently with distinct streams.
#pragma once

#include <ostream>
#include <string>

#include "CLI/CLI.hpp"
#include "absl/status/status.h"

namespace moeserve::engine::pipeline {

// The command's options as typed; RunPlanPipeline validates them.
struct PlanPipelineOptions {
  std::string algorithm;  // dualpipe | dualpipev | 1f1b | zb1p
  std::string ranks;      // positive integer
  std::string chunks;     // positive integer (micro-batches)
  bool forward_only = false;
  std::string times = "F=1,B=2,W=1,FB=3";
  std::string trace_path;  // empty: no trace
};

// Plans, simulates and prints to `out`. Returns InvalidArgument for bad options (the message
// says which and why), other errors for failures after validation.
absl::Status RunPlanPipeline(const PlanPipelineOptions& options, std::ostream& out);

// Adds the `pipeline` subcommand to `plan_command`. Its callback prints to stdout, or prints an
// error to stderr and sets `exit_code` to 2 (bad arguments) or 1 (other failure); it leaves
// `exit_code` alone on success. `exit_code` must outlive the parse.
void RegisterPlanPipelineCommand(CLI::App& plan_command, int& exit_code);

}  // namespace moeserve::engine::pipeline

// The entry point for the main binary, which calls it unqualified.
using moeserve::engine::pipeline::RegisterPlanPipelineCommand;
