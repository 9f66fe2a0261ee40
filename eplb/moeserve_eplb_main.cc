// main() of `moeserve-eplb`, the expert-parallelism load balancer's command line. Subcommands:
//   rebalance   compute placements for load matrices read from a JSON Lines file
//   controller  close the loop: Prometheus expert load in, placements pushed to the servers
// Owns only argument parsing, file handling and exit codes; the work lives in eplb/.

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <csignal>
#include <cstring>
#include <fstream>
#include <iostream>
#include <string>
#include <thread>

#include "CLI/CLI.hpp"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "base/build_info.h"
#include "base/logging.h"
#include "base/metrics_listener.h"
#include "base/regular_file.h"
#include "base/tls_files.h"
#include "eplb/controller.h"
#include "eplb/rebalance_tool.h"
#include "spdlog/spdlog.h"

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
  moeserve::eplb::PrometheusTls prometheus_tls;
  std::string targets;
  moeserve::base::TlsClientFiles targets_tls;
  std::string admin_token_file;
  double window_seconds = 300;
  double interval_seconds = 60;
  std::string metrics_host = "127.0.0.1";
  int metrics_port = -1;
  bool once = false;
  moeserve::eplb::ControllerOptions options;
};

// "90", "90s", "5m", "1h" → seconds: finite, at least 1 s and at most 30 days (Prometheus
// ranges and sleeps stay meaningful). Anything else is an error naming the flag.
std::string ParseDuration(const std::string& text, double* seconds) {
  const std::string error = "takes a duration like 90s, 5m or 1h, from 1s to 30 days";
  if (text.empty()) return error;
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
  // Digits and one decimal point only: no "inf", "nan", signs, exponents or spaces.
  if (number.empty() || number.find_first_not_of("0123456789.") != std::string::npos ||
      std::count(number.begin(), number.end(), '.') > 1 || number == ".") {
    return error;
  }
  const double value = std::stod(number) * scale;
  if (!(value >= 1 && value <= 30 * 86400.0)) return error;
  *seconds = value;
  return "";
}

// A CLI11 check that a double is a finite number in [low, high] (CLI::Range lets NaN through).
CLI::Validator FiniteIn(double low, double high) {
  return CLI::Validator(
      [low, high](std::string& text) -> std::string {
        double value = 0;
        if (!absl::SimpleAtod(text, &value) || !std::isfinite(value) || value < low ||
            value > high) {
          return "must be a finite number in [" + absl::StrCat(low) + ", " + absl::StrCat(high) +
                 "], got " + text;
        }
        return "";
      },
      "FLOAT in [" + absl::StrCat(low) + ", " + absl::StrCat(high) + "]");
}

void AddControllerCommand(CLI::App& app, ControllerArguments& arguments) {
  CLI::App* controller = app.add_subcommand(
      "controller",
      "Every --interval: read the group's placement from the servers, query Prometheus for the "
      "expert load over --window, rebalance, and push the new placement when the predicted "
      "balancedness (mean/max GPU load) improves by more than --min-improvement.");
  controller
      ->add_option("--prometheus-url", arguments.prometheus_url,
                   "Prometheus base URL, e.g. http://127.0.0.1:9090 or https://…")
      ->required();
  controller->add_option("--prometheus-ca", arguments.prometheus_tls.ca,
                         "PEM CA bundle that signed an https Prometheus' certificate (default: "
                         "the system's roots)");
  controller->add_option("--prometheus-cert", arguments.prometheus_tls.cert,
                         "PEM client certificate for a Prometheus that requires one");
  controller->add_option("--prometheus-key", arguments.prometheus_tls.key,
                         "PEM private key of --prometheus-cert");
  controller
      ->add_option("--group", arguments.options.group,
                   "The EP group to balance: mixed, prefill or decode")
      ->capture_default_str()
      ->check(CLI::IsMember({"mixed", "prefill", "decode"}));
  controller
      ->add_option_function<std::string>(
          "--window",
          [&arguments](const std::string& text) {
            if (std::string error = ParseDuration(text, &arguments.window_seconds);
                !error.empty()) {
              throw CLI::ValidationError("--window", error + ", got " + text);
            }
          },
          "Load window (e.g. 90s, 5m; 1s to 30 days)")
      ->default_str("5m");
  controller
      ->add_option_function<std::string>(
          "--interval",
          [&arguments](const std::string& text) {
            if (std::string error = ParseDuration(text, &arguments.interval_seconds);
                !error.empty()) {
              throw CLI::ValidationError("--interval", error + ", got " + text);
            }
          },
          "Time between cycles (1s to 30 days)")
      ->default_str("60s");
  controller
      ->add_option("--targets", arguments.targets,
                   "Comma-separated host:port of the servers' Admin API (the gRPC port, or "
                   "--admin-port) of the group")
      ->required();
  controller->add_flag("--tls", arguments.targets_tls.enabled,
                       "Speak TLS to the targets (implied by --tls-ca/--tls-cert)");
  controller->add_option("--tls-ca", arguments.targets_tls.ca,
                         "PEM CA bundle that signed the targets' certificates (default: the "
                         "system's roots)");
  controller->add_option("--tls-cert", arguments.targets_tls.cert,
                         "PEM client certificate for targets that require one (mTLS)");
  controller->add_option("--tls-key", arguments.targets_tls.key, "PEM private key of --tls-cert");
  controller->add_option("--tls-server-name", arguments.targets_tls.server_name,
                         "Name the targets' certificates carry, when --targets uses addresses");
  controller
      ->add_option("--num-nodes", arguments.options.num_nodes,
                   "Nodes the group spans (hierarchical policy when expert groups divide "
                   "by nodes)")
      ->capture_default_str()
      ->check(CLI::Range(1, 65536));
  controller
      ->add_option("--num-gpus", arguments.options.num_gpus,
                   "GPUs (ranks) of the group; 0 = as the servers report")
      ->check(CLI::Range(0, 1 << 20));
  controller
      ->add_option("--num-replicas", arguments.options.num_replicas,
                   "Physical expert slots per layer; 0 = as the servers report")
      ->check(CLI::Range(0, 1 << 20));
  controller
      ->add_option("--min-improvement", arguments.options.min_improvement,
                   "Balancedness gain (0..1) needed to push")
      ->capture_default_str()
      ->check(FiniteIn(0, 1));
  controller->add_option(
      "--admin-token-file", arguments.admin_token_file,
      "File with the servers' admin bearer token (optional when the targets' Admin "
      "port authenticates by client certificate)");
  controller
      ->add_option("--metrics-host", arguments.metrics_host,
                   "Address the controller's /metrics port binds")
      ->capture_default_str();
  controller
      ->add_option("--metrics-port", arguments.metrics_port,
                   "Serve the controller's own Prometheus metrics (plain HTTP) on this port "
                   "(-1: off)")
      ->capture_default_str()
      ->check(CLI::Range(-1, 65535));
  controller->add_flag("--once", arguments.once, "Run one cycle and exit (0: success)");
  controller->add_flag("--dry-run", arguments.options.dry_run,
                       "Print the plan instead of pushing it");
  controller->footer(
      "Exit status: 0 stopped by SIGTERM/SIGINT, or --once succeeded; 1 the --once cycle failed; "
      "2 a file could not be read or a listener could not start; 100 and above: the command "
      "line was invalid.");
}

std::atomic<bool> stop_requested{false};

int RunController(ControllerArguments& arguments) {
  arguments.options.window_seconds = arguments.window_seconds;
  std::string token;
  if (!arguments.admin_token_file.empty()) {
    absl::StatusOr<std::string> text =
        moeserve::base::ReadRegularFile(arguments.admin_token_file, 64 << 10);
    if (!text.ok()) {
      spdlog::error("moeserve-eplb controller: the admin token file: {}",
                    std::string(text.status().message()));
      return kExitIoError;
    }
    token = std::string(absl::StripAsciiWhitespace(text->substr(0, text->find('\n'))));
    if (token.empty()) {
      spdlog::error("moeserve-eplb controller: the admin token file {} is empty",
                    arguments.admin_token_file);
      return kExitIoError;
    }
  } else if (arguments.targets_tls.cert.empty()) {
    spdlog::error(
        "moeserve-eplb controller: give --admin-token-file, or --tls-cert/--tls-key for targets "
        "that authenticate by client certificate");
    return kExitIoError;
  }
  auto registry = std::make_shared<prometheus::Registry>();
  moeserve::base::RegisterBuildInfo(*registry, "eplb-controller");
  std::unique_ptr<moeserve::base::MetricsListener> metrics;
  if (arguments.metrics_port >= 0) {
    absl::StatusOr<std::unique_ptr<moeserve::base::MetricsListener>> started =
        moeserve::base::MetricsListener::Start(arguments.metrics_host, arguments.metrics_port);
    if (!started.ok()) {
      spdlog::error("moeserve-eplb controller: {}", std::string(started.status().message()));
      return kExitIoError;
    }
    metrics = *std::move(started);
    metrics->RegisterCollectable(registry);
  }
  auto load_source =
      moeserve::eplb::MakePrometheusLoadSource(arguments.prometheus_url, arguments.prometheus_tls);
  std::vector<std::unique_ptr<moeserve::eplb::PlacementTarget>> owned_targets;
  std::vector<moeserve::eplb::PlacementTarget*> targets;
  for (absl::string_view address : absl::StrSplit(arguments.targets, ',', absl::SkipWhitespace())) {
    absl::StatusOr<std::shared_ptr<grpc::Channel>> channel =
        moeserve::base::MakeChannel(std::string(address), arguments.targets_tls);
    if (!channel.ok()) {
      spdlog::error("moeserve-eplb controller: --tls-*: {}",
                    std::string(channel.status().message()));
      return kExitIoError;
    }
    owned_targets.push_back(
        moeserve::eplb::MakeAdminPlacementTarget(std::string(address), *channel, token));
    targets.push_back(owned_targets.back().get());
  }
  moeserve::eplb::Controller controller(arguments.options, *load_source, targets, registry.get());
  std::signal(SIGTERM, [](int) { stop_requested = true; });
  std::signal(SIGINT, [](int) { stop_requested = true; });
  while (true) {
    auto report = controller.RunCycle();
    if (!report.ok()) {
      spdlog::error("moeserve-eplb controller: cycle failed: {}",
                    std::string(report.status().message()));
      if (arguments.once) return 1;
    } else {
      spdlog::info("moeserve-eplb controller: group {}: balancedness {} -> {}; {}",
                   arguments.options.group, report->balancedness_before, report->balancedness_after,
                   report->reason);
      if (arguments.options.dry_run && !report->phy2log.empty()) {
        for (size_t layer = 0; layer < report->phy2log.size(); ++layer) {
          std::cout << "layer " << layer << " phy2log:";
          for (int expert : report->phy2log[layer]) std::cout << " " << expert;
          std::cout << "\n";
        }
        std::cout << std::flush;
      }
      if (arguments.once) return 0;
    }
    for (double waited = 0; waited < arguments.interval_seconds && !stop_requested; waited += 0.1) {
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
  app.set_version_flag("--version", moeserve::base::Version());
  app.require_subcommand(1);
  app.fallthrough();
  moeserve::base::LogOptions log_options;
  moeserve::base::AddLoggingOptions(app, log_options);
  bool check_flags = false;
  app.add_flag("--check-flags", check_flags,
               "Parse and validate the command's flags, print `flags accepted` and exit 0 "
               "without starting anything (non-zero with the reason otherwise)");
  app.parse_complete_callback([&] {
    const std::string component = app.get_subcommands().empty()
                                      ? std::string("moeserve-eplb")
                                      : "eplb-" + app.get_subcommands().front()->get_name();
    if (absl::Status status = moeserve::base::ConfigureLogging(log_options, component);
        !status.ok()) {
      throw CLI::ValidationError("--log-level/--log-format", std::string(status.message()));
    }
  });
  RebalanceArguments rebalance_arguments;
  AddRebalanceCommand(app, rebalance_arguments);
  ControllerArguments controller_arguments;
  AddControllerCommand(app, controller_arguments);

  CLI11_PARSE(app, argc, argv);
  if (check_flags) {
    std::cout << "moeserve-eplb " << app.get_subcommands().front()->get_name()
              << ": flags accepted\n";
    return 0;
  }

  if (app.got_subcommand("rebalance")) return RunRebalance(rebalance_arguments);
  if (app.got_subcommand("controller")) return RunController(controller_arguments);
  return kExitIoError;  // unreachable: require_subcommand(1) rejects anything else
}
