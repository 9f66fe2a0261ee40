// main() of `moeserve-eplb-bench`: times EPLB rebalancing on DeepSeek-V3's shape (61 MoE layers x
// 256 experts, 288 slots, 4 nodes x 8 GPUs, 8 groups) with random float32 loads, at three depths:
// the algorithm alone, the in-memory JSON Lines round trip, and whole `moeserve-eplb rebalance`
// processes reading and writing files. The last is the number the requirement is about:
// at least 10x faster than the ~0.2 s of DeepSeek's Python reference on a 2-core machine.

#include <fcntl.h>
#include <spawn.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/strings/str_format.h"
#include "eplb/rebalance.h"
#include "eplb/rebalance_tool.h"

extern char** environ;

namespace {

using Clock = std::chrono::steady_clock;
constexpr double kPythonReferenceMs = 200.0;  // the figure for the same problem

struct BenchArguments {
  int num_layers = 61;
  int num_experts = 256;
  moeserve::eplb::ClusterShape shape{
      .num_replicas = 288, .num_groups = 8, .num_nodes = 4, .num_gpus = 32};
  int iterations = 200;
  int process_runs = 30;
  unsigned seed = 1;
  std::string tool_path;
  std::string keep_input_path;
};

struct Timing {
  std::string stage;
  std::vector<double> milliseconds;      // wall clock per run
  std::vector<double> cpu_milliseconds;  // CPU (user + system) per run, this process + children
};

// CPU time used so far by this process and by its children that have been waited for. On a
// shared 2-core machine wall time includes waiting for a core; CPU time does not.
double CpuMilliseconds() {
  timespec self{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &self);
  rusage children{};
  getrusage(RUSAGE_CHILDREN, &children);
  const auto to_ms = [](const timeval& time) { return time.tv_sec * 1e3 + time.tv_usec / 1e3; };
  return self.tv_sec * 1e3 + self.tv_nsec / 1e6 + to_ms(children.ru_utime) +
         to_ms(children.ru_stime);
}

double Median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const size_t middle = values.size() / 2;
  return values.size() % 2 == 1 ? values[middle] : (values[middle - 1] + values[middle]) / 2;
}

// Runs `body` `runs` times and records each run's wall time. Returns false (after printing why)
// as soon as a run reports failure.
bool TimeRuns(int runs, const std::function<bool()>& body, Timing* timing) {
  for (int run = 0; run < runs; ++run) {
    const Clock::time_point start = Clock::now();
    const double cpu_start = CpuMilliseconds();
    if (!body()) return false;
    timing->milliseconds.push_back(
        std::chrono::duration<double, std::milli>(Clock::now() - start).count());
    timing->cpu_milliseconds.push_back(CpuMilliseconds() - cpu_start);
  }
  return true;
}

std::vector<std::vector<float>> RandomLoads(const BenchArguments& arguments) {
  std::mt19937 generator(arguments.seed);
  // Token counts per expert over a metrics window; uniform keeps every run comparable.
  std::uniform_real_distribution<float> tokens(0.0f, 100000.0f);
  std::vector<std::vector<float>> weight(arguments.num_layers,
                                         std::vector<float>(arguments.num_experts));
  for (auto& row : weight) {
    for (float& load : row) load = tokens(generator);
  }
  return weight;
}

std::string ToJsonLine(const std::vector<std::vector<float>>& weight,
                       const moeserve::eplb::ClusterShape& shape) {
  std::string line = "{\"id\":\"bench\",\"weight\":[";
  char buffer[32];
  for (size_t layer = 0; layer < weight.size(); ++layer) {
    line += layer > 0 ? ",[" : "[";
    for (size_t expert = 0; expert < weight[layer].size(); ++expert) {
      if (expert > 0) line += ',';
      // Shortest text that reads back as the same float32.
      line.append(buffer,
                  std::to_chars(buffer, buffer + sizeof(buffer), weight[layer][expert]).ptr);
    }
    line += ']';
  }
  line +=
      absl::StrFormat("],\"num_replicas\":%d,\"num_groups\":%d,\"num_nodes\":%d,\"num_gpus\":%d}\n",
                      shape.num_replicas, shape.num_groups, shape.num_nodes, shape.num_gpus);
  return line;
}

// Spawns `argv` with standard output and error discarded; true when it exits with status 0.
bool RunProcess(const std::vector<std::string>& argv) {
  std::vector<char*> raw_argv;
  for (const std::string& argument : argv) raw_argv.push_back(const_cast<char*>(argument.c_str()));
  raw_argv.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, "/dev/null", O_WRONLY, 0);
  posix_spawn_file_actions_addopen(&actions, STDERR_FILENO, "/dev/null", O_WRONLY, 0);
  pid_t pid = 0;
  const int spawn_error =
      posix_spawn(&pid, raw_argv[0], &actions, nullptr, raw_argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (spawn_error != 0) {
    std::cerr << "cannot start " << argv[0] << ": " << std::strerror(spawn_error) << "\n";
    return false;
  }
  int wait_status = 0;
  if (waitpid(pid, &wait_status, 0) != pid || !WIFEXITED(wait_status) ||
      WEXITSTATUS(wait_status) != 0) {
    std::cerr << argv[0] << " failed (wait status " << wait_status << ")\n";
    return false;
  }
  return true;
}

void PrintTable(const BenchArguments& arguments, const std::vector<Timing>& timings) {
  std::cout << absl::StrFormat(
      "EPLB rebalance: %d layers x %d experts, %d slots, %d nodes, %d GPUs, %d groups, "
      "random float32 loads (seed %u)\n\n",
      arguments.num_layers, arguments.num_experts, arguments.shape.num_replicas,
      arguments.shape.num_nodes, arguments.shape.num_gpus, arguments.shape.num_groups,
      arguments.seed);
  std::cout << absl::StrFormat("| %-52s | %5s | %9s | %9s | %9s | %13s | %12s |\n", "stage", "runs",
                               "median ms", "min ms", "max ms", "median CPU ms", "vs 0.2 s ref");
  std::cout << "|" << std::string(54, '-') << "|------:|----------:|----------:|----------:|"
            << "--------------:|-------------:|\n";
  for (const Timing& timing : timings) {
    const double median = Median(timing.milliseconds);
    std::cout << absl::StrFormat(
        "| %-52s | %5d | %9.3f | %9.3f | %9.3f | %13.3f | %11.0fx |\n", timing.stage,
        timing.milliseconds.size(), median,
        *std::min_element(timing.milliseconds.begin(), timing.milliseconds.end()),
        *std::max_element(timing.milliseconds.begin(), timing.milliseconds.end()),
        Median(timing.cpu_milliseconds), kPythonReferenceMs / median);
  }
  std::cout << "\n(speed-up = 200 ms / median wall time; the 200 ms is the issue's figure for "
               "DeepSeek's Python reference on a 2-core machine)\n";
}

}  // namespace

int main(int argc, char** argv) {
  BenchArguments arguments;
  CLI::App app(
      "moeserve-eplb-bench: time EPLB rebalancing (algorithm, JSON Lines round trip, whole "
      "moeserve-eplb processes) and print a Markdown table.",
      "moeserve-eplb-bench");
  app.add_option("--layers", arguments.num_layers, "MoE layers")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--experts", arguments.num_experts, "logical experts per layer")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--replicas", arguments.shape.num_replicas, "physical slots per layer")
      ->capture_default_str();
  app.add_option("--groups", arguments.shape.num_groups, "expert groups")->capture_default_str();
  app.add_option("--nodes", arguments.shape.num_nodes, "nodes")->capture_default_str();
  app.add_option("--gpus", arguments.shape.num_gpus, "GPUs in total")->capture_default_str();
  app.add_option("--iterations", arguments.iterations, "runs of each in-process stage")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--process-runs", arguments.process_runs,
                 "moeserve-eplb processes to time (0 skips them)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  app.add_option("--seed", arguments.seed, "random seed for the loads")->capture_default_str();
  app.add_option("--tool", arguments.tool_path,
                 "moeserve-eplb binary to time (default: the one next to this binary)");
  app.add_option("--keep-input", arguments.keep_input_path,
                 "also write the benchmark's JSON Lines input to this file, e.g. to time "
                 "moeserve-eplb by hand");
  CLI11_PARSE(app, argc, argv);

  const std::vector<std::vector<float>> weight = RandomLoads(arguments);
  if (const absl::Status status = moeserve::eplb::ValidateRebalanceInput(weight, arguments.shape);
      !status.ok()) {
    std::cerr << "moeserve-eplb-bench: " << status.message() << "\n";
    return 2;
  }
  const std::string input_line = ToJsonLine(weight, arguments.shape);
  std::vector<Timing> timings;

  Timing algorithm{"RebalanceExperts (in-process)", {}, {}};
  if (!TimeRuns(
          arguments.iterations,
          [&] { return moeserve::eplb::RebalanceExperts(weight, arguments.shape).ok(); },
          &algorithm)) {
    return 1;
  }
  timings.push_back(algorithm);

  Timing round_trip{"parse JSONL + rebalance + write JSONL (in-process)", {}, {}};
  if (!TimeRuns(
          arguments.iterations,
          [&] {
            std::istringstream input(input_line);
            std::ostringstream output;
            const auto stats = moeserve::eplb::RunRebalanceTool(input, output, nullptr);
            return stats.ok() && stats->num_failed_cases == 0;
          },
          &round_trip)) {
    return 1;
  }
  timings.push_back(round_trip);

  if (!arguments.keep_input_path.empty()) {
    std::ofstream(arguments.keep_input_path) << input_line;
  }
  if (arguments.process_runs > 0) {
    std::string tool = arguments.tool_path;
    if (tool.empty()) {
      tool = (std::filesystem::read_symlink("/proc/self/exe").parent_path() / "moeserve-eplb")
                 .string();
    }
    std::string directory_template =
        (std::filesystem::temp_directory_path() / "moeserve-eplb-bench.XXXXXX").string();
    if (mkdtemp(directory_template.data()) == nullptr) {
      std::cerr << "moeserve-eplb-bench: cannot create a temporary directory\n";
      return 2;
    }
    const std::filesystem::path directory = directory_template;
    const std::string input_path = (directory / "input.jsonl").string();
    const std::string output_path = (directory / "output.jsonl").string();
    std::ofstream(input_path) << input_line;

    Timing startup{"moeserve-eplb --help (process start-up only)", {}, {}};
    Timing process{"moeserve-eplb rebalance process (file in, file out)", {}, {}};
    const bool ok = TimeRuns(
                        arguments.process_runs,
                        [&] {
                          return RunProcess({tool, "--help"});
                        },
                        &startup) &&
                    TimeRuns(
                        arguments.process_runs,
                        [&] {
                          return RunProcess(
                              {tool, "rebalance", "--input", input_path, "--output", output_path});
                        },
                        &process);
    std::filesystem::remove_all(directory);
    if (!ok) return 1;
    timings.push_back(startup);
    timings.push_back(process);
  }
  PrintTable(arguments, timings);
  return 0;
}
