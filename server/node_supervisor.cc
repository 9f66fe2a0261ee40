#include "server/node_supervisor.h"

#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "server/process_health.h"
#include "spdlog/spdlog.h"

extern char** environ;

namespace moeserve::server {
namespace {

using Clock = std::chrono::steady_clock;

int EnvironmentInt(const char* name, int fallback) {
  const char* text = std::getenv(name);
  int value = 0;
  if (text == nullptr || !absl::SimpleAtoi(text, &value)) return fallback;
  return value;
}

struct Child {
  int rank = 0;
  int port = 0;
  pid_t pid = -1;
  bool running = false;
  int exit_code = 0;
  int misses = 0;
  bool answered = false;
  std::unique_ptr<grpc::health::v1::Health::Stub> health;
};

// Whether the rank answers that it is live (health `liveness` SERVING: loading or serving, not
// wedged; see process_health.h).
bool Answers(Child& child, std::chrono::milliseconds deadline) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + deadline);
  grpc::health::v1::HealthCheckRequest request;
  request.set_service(kLivenessService);
  grpc::health::v1::HealthCheckResponse response;
  return child.health->Check(&context, request, &response).ok() &&
         response.status() == grpc::health::v1::HealthCheckResponse::SERVING;
}

// Whether `pid` exits within `timeout` (its wait status in `status`).
bool ExitsWithin(pid_t pid, std::chrono::milliseconds timeout, int* status) {
  const auto give_up = Clock::now() + timeout;
  while (Clock::now() < give_up) {
    if (waitpid(pid, status, WNOHANG) == pid) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return false;
}

std::string ExitDescription(int status) {
  if (WIFEXITED(status)) return absl::StrCat("exited with code ", WEXITSTATUS(status));
  if (WIFSIGNALED(status)) return absl::StrCat("was killed by signal ", WTERMSIG(status));
  return "ended";
}

// `moeserve rank` and its flags for local rank `local` (the flags the node sets, then the
// node's rank arguments).
std::vector<std::string> RankCommand(const std::string& self, const NodeOptions& options,
                                     int group_size, int rank, int local, bool check_flags) {
  std::vector<std::string> arguments = {self};
  if (check_flags) arguments.push_back("--check-flags");
  const std::vector<std::string> own = {
      "rank", "--group-size", std::to_string(group_size), "--rank", std::to_string(rank), "--port",
      std::to_string(options.port + local), "--metrics-port",
      std::to_string(options.metrics_port < 0 ? -1 : options.metrics_port + local),
      // The rank ends with this supervisor, however it ends.
      "--supervisor-pid", std::to_string(getpid())};
  arguments.insert(arguments.end(), own.begin(), own.end());
  arguments.insert(arguments.end(), options.rank_arguments.begin(), options.rank_arguments.end());
  return arguments;
}

// Runs `moeserve --check-flags rank ...` for the node's first rank; its exit code.
int CheckRankFlags(const std::string& self, const NodeOptions& options, int group_size,
                   int node_index) {
  std::vector<std::string> arguments =
      RankCommand(self, options, group_size, node_index * options.ranks_per_node, 0, true);
  std::vector<char*> argv;
  for (std::string& argument : arguments) argv.push_back(argument.data());
  argv.push_back(nullptr);
  pid_t pid = -1;
  if (int e = posix_spawn(&pid, self.c_str(), nullptr, nullptr, argv.data(), environ); e != 0) {
    spdlog::error("moeserve node: cannot check the ranks' flags: {}", strerror(e));
    return 1;
  }
  int status = 0;
  waitpid(pid, &status, 0);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
    return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
  std::cout << "moeserve node: flags accepted\n";
  return 0;
}

}  // namespace

int RunNode(const NodeOptions& options) {
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  const int node_index =
      options.node_index >= 0 ? options.node_index : EnvironmentInt("LWS_WORKER_INDEX", 0);
  const int num_nodes =
      options.num_nodes >= 1 ? options.num_nodes : EnvironmentInt("LWS_GROUP_SIZE", 1);
  if (options.ranks_per_node < 1 || num_nodes < 1 || node_index < 0 || node_index >= num_nodes) {
    spdlog::error("moeserve node: node {} of {} with {} ranks per node is not a valid layout",
                  node_index, num_nodes, options.ranks_per_node);
    return 1;
  }
  for (const std::string& argument : options.rank_arguments) {
    for (const char* own : {"--rank", "--group-size", "--port", "--metrics-port"}) {
      if (argument == own || argument.rfind(absl::StrCat(own, "="), 0) == 0) {
        spdlog::error(
            "moeserve node: {} is the node's to set for each rank (give the node --port, "
            "--metrics-port, --ranks-per-node and --num-nodes instead)",
            own);
        return 2;
      }
    }
  }
  const int group_size = options.ranks_per_node * num_nodes;
  std::error_code error;
  const std::string self = std::filesystem::read_symlink("/proc/self/exe", error).string();
  if (error) {
    spdlog::error("moeserve node: cannot find its own executable: {}",
                  std::string(error.message()));
    return 1;
  }
  if (options.check_flags) return CheckRankFlags(self, options, group_size, node_index);

  // The ranks take signals normally (the supervisor's mask is not theirs).
  posix_spawnattr_t attributes;
  posix_spawnattr_init(&attributes);
  sigset_t none;
  sigemptyset(&none);
  posix_spawnattr_setsigmask(&attributes, &none);
  posix_spawnattr_setflags(&attributes, POSIX_SPAWN_SETSIGMASK);
  std::vector<Child> children(options.ranks_per_node);
  for (int local = 0; local < options.ranks_per_node; ++local) {
    Child& child = children[local];
    child.rank = node_index * options.ranks_per_node + local;
    child.port = options.port + local;
    std::vector<std::string> arguments =
        RankCommand(self, options, group_size, child.rank, local, /*check_flags=*/false);
    std::vector<char*> argv;
    for (std::string& argument : arguments) argv.push_back(argument.data());
    argv.push_back(nullptr);
    if (int e = posix_spawn(&child.pid, self.c_str(), nullptr, &attributes, argv.data(), environ);
        e != 0) {
      spdlog::error("moeserve node: cannot start rank {}: {}", child.rank, strerror(e));
      return 1;
    }
    child.running = true;
    child.health = grpc::health::v1::Health::NewStub(grpc::CreateChannel(
        absl::StrCat("127.0.0.1:", child.port), grpc::InsecureChannelCredentials()));
  }
  posix_spawnattr_destroy(&attributes);
  spdlog::info("moeserve node: node {} of {} started ranks {}..{} of {}", node_index, num_nodes,
               children.front().rank, children.back().rank, group_size);

  int exit_code = 0;
  std::string reason;
  const auto interval =
      std::chrono::milliseconds(static_cast<int64_t>(options.health_interval_seconds * 1000));
  // A rank must answer within this long of starting (it listens before it loads its model).
  const auto first_answer_deadline = Clock::now() + std::chrono::seconds(60);
  auto next_check = Clock::now() + interval;
  while (reason.empty()) {
    siginfo_t info;
    const timespec poll{0, 100 * 1000 * 1000};
    const int signal_number = sigtimedwait(&signals, &info, &poll);
    if (signal_number == SIGTERM || signal_number == SIGINT) {
      reason = absl::StrCat("received ", signal_number == SIGTERM ? "SIGTERM" : "SIGINT");
      break;
    }
    for (Child& child : children) {
      int status = 0;
      if (child.running && waitpid(child.pid, &status, WNOHANG) == child.pid) {
        child.running = false;
        child.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        reason = absl::StrCat("rank ", child.rank, " ", ExitDescription(status));
        exit_code = child.exit_code != 0 ? child.exit_code : 1;
        break;
      }
    }
    if (!reason.empty() || Clock::now() < next_check) continue;
    next_check = Clock::now() + interval;
    for (Child& child : children) {
      if (Answers(child, std::min(interval, std::chrono::milliseconds(1000)))) {
        child.answered = true;
        child.misses = 0;
      } else if (child.answered || Clock::now() > first_answer_deadline) {
        if (++child.misses >= options.health_misses) {
          // A rank whose group failed stops answering while it tears down (freeing a GPU
          // takes a while) and then exits 3: report that exit rather than a wedged rank.
          int status = 0;
          if (ExitsWithin(child.pid, std::chrono::seconds(5), &status)) {
            child.running = false;
            child.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
            reason = absl::StrCat("rank ", child.rank, " ", ExitDescription(status));
            exit_code = child.exit_code != 0 ? child.exit_code : 1;
          } else {
            reason = absl::StrCat("rank ", child.rank, " stopped answering its health check");
            exit_code = 1;
          }
          break;
        }
      }
    }
  }
  if (exit_code == 0) {
    spdlog::info("moeserve node: {}; stopping the node's ranks", reason);
  } else {
    spdlog::error("moeserve node: {}; stopping the node's ranks", reason);
  }
  for (Child& child : children) {
    if (child.running) kill(child.pid, SIGTERM);
  }
  const auto give_up =
      Clock::now() +
      std::chrono::milliseconds(static_cast<int64_t>(options.shutdown_grace_seconds * 1000));
  for (Child& child : children) {
    while (child.running) {
      int status = 0;
      if (waitpid(child.pid, &status, WNOHANG) == child.pid) {
        child.running = false;
        break;
      }
      if (Clock::now() > give_up) {
        kill(child.pid, SIGKILL);
        waitpid(child.pid, &status, 0);
        child.running = false;
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  }
  spdlog::info("moeserve node: stopped (exit code {})", exit_code);
  return exit_code;
}

}  // namespace moeserve::server
