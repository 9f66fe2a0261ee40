// main() of `moeserve-eplb`, the expert-parallelism load balancer's command line. Subcommands:
//   rebalance   compute placements for load matrices read from a JSON Lines file
// (The `controller` subcommand, which closes the loop through Prometheus, will join it here.)
// Owns only argument parsing, file handling and exit codes; the work lives in eplb/.

#include <cerrno>
#include <cstring>
#include <fstream>
#include <iostream>
#include <string>

#include "CLI/CLI.hpp"
#include "eplb/rebalance_tool.h"

namespace {

// Exit codes, documented in --help.
constexpr int kExitOk = 0;
constexpr int kExitSomeCasesInvalid = 1;
constexpr int kExitIoError = 2;

struct RebalanceArguments {
  std::string input_path;
  std::string output_path;
  bool summary = false;
};

void AddRebalanceCommand(CLI::App& app, RebalanceArguments& arguments) {
  CLI::App* rebalance = app.add_subcommand(
      "rebalance",
      "Compute expert placements (DeepSeek's EPLB algorithm) for each case of a JSON Lines "
      "file.");
  rebalance
      ->add_option("--input", arguments.input_path,
                   "JSON Lines file, one case per line: {\"id\": any, \"weight\": "
                   "[[load per expert] per layer], \"num_replicas\": R, \"num_groups\": G, "
                   "\"num_nodes\": N, \"num_gpus\": P}. '-' reads standard input.")
      ->required();
  rebalance
      ->add_option("--output", arguments.output_path,
                   "Where to write one line per case, in input order: {\"id\", \"phy2log\", "
                   "\"log2phy\", \"logcnt\"}, or {\"id\", \"error\"} for an invalid case. '-' "
                   "writes standard output.")
      ->required();
  rebalance->add_flag("--summary", arguments.summary,
                      "Also print per-layer balancedness (mean/max GPU load) before (one replica "
                      "per expert, in id order) and after rebalancing; to standard output, or to "
                      "standard error when --output is '-'.");
  rebalance->footer(
      "Invalid cases do not stop the run. Exit status: 0 every case succeeded; 1 some cases "
      "were invalid (see their error lines); 2 a file could not be read or written; 100 and "
      "above: the command line was invalid.\n"
      "Format and algorithm: docs/eplb.md.");
}

int RunRebalance(const RebalanceArguments& arguments) {
  std::ifstream input_file;
  std::istream* input = &std::cin;
  if (arguments.input_path != "-") {
    input_file.open(arguments.input_path);
    if (!input_file) {
      std::cerr << "moeserve-eplb: cannot open input " << arguments.input_path << ": "
                << std::strerror(errno) << "\n";
      return kExitIoError;
    }
    input = &input_file;
  }
  std::ofstream output_file;
  std::ostream* output = &std::cout;
  std::ostream* summary = arguments.summary ? &std::cout : nullptr;
  if (arguments.output_path != "-") {
    output_file.open(arguments.output_path, std::ios::out | std::ios::trunc);
    if (!output_file) {
      std::cerr << "moeserve-eplb: cannot open output " << arguments.output_path << ": "
                << std::strerror(errno) << "\n";
      return kExitIoError;
    }
    output = &output_file;
  } else if (arguments.summary) {
    summary = &std::cerr;  // keep standard output pure JSON Lines
  }

  const auto stats = moeserve::eplb::RunRebalanceTool(*input, *output, summary);
  if (!stats.ok()) {
    std::cerr << "moeserve-eplb: " << stats.status().message() << "\n";
    return kExitIoError;
  }
  if (output_file.is_open()) {
    output_file.close();  // flushes; a full disk shows up here
    if (output_file.fail()) {
      std::cerr << "moeserve-eplb: cannot write " << arguments.output_path << "\n";
      return kExitIoError;
    }
  }
  if (stats->num_failed_cases > 0) {
    std::cerr << "moeserve-eplb: " << stats->num_failed_cases << " of " << stats->num_cases
              << " cases were invalid; see their \"error\" lines\n";
    return kExitSomeCasesInvalid;
  }
  return kExitOk;
}

}  // namespace

int main(int argc, char** argv) {
  std::ios::sync_with_stdio(false);
  CLI::App app(
      "moeserve-eplb: expert-parallelism load balancer for moeserve. Replicates hot experts "
      "into redundant slots and packs the replicas so that GPU loads even out.",
      "moeserve-eplb");
  app.require_subcommand(1);
  RebalanceArguments rebalance_arguments;
  AddRebalanceCommand(app, rebalance_arguments);

  CLI11_PARSE(app, argc, argv);

  if (app.got_subcommand("rebalance")) return RunRebalance(rebalance_arguments);
  return kExitIoError;  // unreachable: require_subcommand(1) rejects anything else
}
