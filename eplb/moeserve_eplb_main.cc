// main() of `moeserve-eplb`, the expert-parallelism load balancer's command line. Subcommands:
//   rebalance   compute placements for load matrices read from a JSON Lines file
//   controller  close the loop: Prometheus expert load in, placements pushed to the servers
// Owns only argument parsing, file handling and exit codes; the work lives in eplb/.

#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstring>
#include <fstream>
#include <iostream>
#include <string>
#include <thread>

#include "CLI/CLI.hpp"
#include "absl/strings/str_split.h"
#include "eplb/controller.h"
#include "eplb/rebalance_tool.h"
#include "prometheus/exposer.h"

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

struct ControllerArguments {
  std::string prometheus_url;
  std::string targets;
  std::string admin_token_file;
  std::string window = "5m";
  std::string interval = "60s";
  int metrics_port = -1;
  bool once = false;
  moeserve::eplb::ControllerOptions options;
};

// "90", "90s", "5m", "1h" → seconds; negative on error.
double ParseDuration(const std::string& text) {
  if (text.empty()) return -1;
  double scale = 1;
  std::string number = text;
  switch (text.back()) {
    case 's':
      number.pop_back();
      break;
    case 'm':
      scale = 60;
      number.pop_back();
      break;
    case 'h':
      scale = 3600;
      number.pop_back();
      break;
    default:
      break;
  }
  try {
    size_t used = 0;
    const double value = std::stod(number, &used);
    if (used != number.size() || !(value > 0)) return -1;
    return value * scale;
  } catch (const std::exception&) {
    return -1;
  }
}

void AddControllerCommand(CLI::App& app, ControllerArguments& arguments) {
  CLI::App* controller = app.add_subcommand(
      "controller",
      "Every --interval: read the group's placement from the servers, query Prometheus for the "
      "expert load over --window, rebalance, and push the new placement when the predicted "
      "balancedness (mean/max GPU load) improves by more than --min-improvement.");
  controller
      ->add_option("--prometheus-url", arguments.prometheus_url,
                   "Prometheus base URL, e.g. http://127.0.0.1:9090")
      ->required();
  controller
      ->add_option("--group", arguments.options.group,
                   "The EP group to balance: mixed, prefill or decode")
      ->capture_default_str();
  controller->add_option("--window", arguments.window, "Load window (e.g. 90s, 5m)")
      ->capture_default_str();
  controller->add_option("--interval", arguments.interval, "Time between cycles")
      ->capture_default_str();
  controller
      ->add_option("--targets", arguments.targets,
                   "Comma-separated host:port of the servers (Admin API) of the group")
      ->required();
  controller
      ->add_option("--num-nodes", arguments.options.num_nodes,
                   "Nodes the group spans (hierarchical policy when expert groups divide "
                   "by nodes)")
      ->capture_default_str();
  controller->add_option("--num-gpus", arguments.options.num_gpus,
                         "GPUs (ranks) of the group; 0 = as the servers report");
  controller->add_option("--num-replicas", arguments.options.num_replicas,
                         "Physical expert slots per layer; 0 = as the servers report");
  controller
      ->add_option("--min-improvement", arguments.options.min_improvement,
                   "Balancedness gain (0..1) needed to push")
      ->capture_default_str();
  controller
      ->add_option("--admin-token-file", arguments.admin_token_file,
                   "File with the servers' admin bearer token")
      ->required();
  controller
      ->add_option("--metrics-port", arguments.metrics_port,
                   "Serve the controller's own Prometheus metrics on this port (-1: off)")
      ->capture_default_str();
  controller->add_flag("--once", arguments.once, "Run one cycle and exit (0: success)");
  controller->add_flag("--dry-run", arguments.options.dry_run,
                       "Print the plan instead of pushing it");
}

std::atomic<bool> stop_requested{false};

int RunController(ControllerArguments& arguments) {
  arguments.options.window_seconds = ParseDuration(arguments.window);
  const double interval = ParseDuration(arguments.interval);
  if (arguments.options.window_seconds <= 0 || interval <= 0) {
    std::cerr
        << "moeserve-eplb controller: --window and --interval take durations like 90s or 5m\n";
    return kExitIoError;
  }
  std::ifstream token_file(arguments.admin_token_file);
  std::string token;
  if (!token_file || !std::getline(token_file, token) || token.empty()) {
    std::cerr << "moeserve-eplb controller: cannot read a token from " << arguments.admin_token_file
              << "\n";
    return kExitIoError;
  }
  while (!token.empty() && std::isspace(static_cast<unsigned char>(token.back()))) token.pop_back();
  auto registry = std::make_shared<prometheus::Registry>();
  std::unique_ptr<prometheus::Exposer> exposer;
  if (arguments.metrics_port >= 0) {
    exposer =
        std::make_unique<prometheus::Exposer>("0.0.0.0:" + std::to_string(arguments.metrics_port));
    exposer->RegisterCollectable(registry);
  }
  auto load_source = moeserve::eplb::MakePrometheusLoadSource(arguments.prometheus_url);
  std::vector<std::unique_ptr<moeserve::eplb::PlacementTarget>> owned_targets;
  std::vector<moeserve::eplb::PlacementTarget*> targets;
  for (absl::string_view address : absl::StrSplit(arguments.targets, ',', absl::SkipWhitespace())) {
    owned_targets.push_back(moeserve::eplb::MakeAdminPlacementTarget(std::string(address), token));
    targets.push_back(owned_targets.back().get());
  }
  moeserve::eplb::Controller controller(arguments.options, *load_source, targets, registry.get());
  std::signal(SIGTERM, [](int) { stop_requested = true; });
  std::signal(SIGINT, [](int) { stop_requested = true; });
  while (true) {
    auto report = controller.RunCycle();
    if (!report.ok()) {
      std::cerr << "moeserve-eplb controller: cycle failed: " << report.status().message() << "\n";
      if (arguments.once) return 1;
    } else {
      std::cout << "moeserve-eplb controller: group " << arguments.options.group
                << ": balancedness " << report->balancedness_before << " -> "
                << report->balancedness_after << "; " << report->reason << std::endl;
      if (arguments.options.dry_run && !report->phy2log.empty()) {
        for (size_t layer = 0; layer < report->phy2log.size(); ++layer) {
          std::cout << "layer " << layer << " phy2log:";
          for (int expert : report->phy2log[layer]) std::cout << " " << expert;
          std::cout << "\n";
        }
      }
      if (arguments.once) return 0;
    }
    for (double waited = 0; waited < interval && !stop_requested; waited += 0.1) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    if (stop_requested) return 0;
  }
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
  ControllerArguments controller_arguments;
  AddControllerCommand(app, controller_arguments);

  CLI11_PARSE(app, argc, argv);

  if (app.got_subcommand("rebalance")) return RunRebalance(rebalance_arguments);
  if (app.got_subcommand("controller")) return RunController(controller_arguments);
  return kExitIoError;  // unreachable: require_subcommand(1) rejects anything else
}
