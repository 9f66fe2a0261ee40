// One process per GPU: N processes of nccl_rank_process, configured only by the environment as
// a deployment would configure them, form one NCCL group through a rendezvous file or an id
// given to all, and exchange data. A rank whose peers never come fails with a deadline instead
// of hanging. Skipped with fewer than two GPUs.
#include <cuda_runtime_api.h>
#include <nccl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "engine/comm/nccl_bootstrap.h"
#include "engine/comm/nccl_communicator.h"
#include "gtest/gtest.h"

extern char** environ;

namespace moeserve::engine::parallel {
namespace {

int VisibleGpus() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess ? count : 0;
}

// The rank program sits beside this test's executable (the build tree, or a bundle).
std::string RankProgram() {
  return (std::filesystem::read_symlink("/proc/self/exe").parent_path() / "gpu_nccl_rank_process")
      .string();
}

std::string FreshPath(const char* name) {
  return ::testing::TempDir() + "/" + name + "-" + std::to_string(getpid()) + "-" +
         std::to_string(std::chrono::steady_clock::now().time_since_epoch().count());
}

// Starts the rank program with `environment` added to this process's and the group timeout
// `timeout_seconds`; returns its pid.
pid_t Start(const std::vector<std::string>& environment, int timeout_seconds = 60) {
  std::vector<std::string> strings;
  for (char** e = environ; *e != nullptr; ++e) strings.emplace_back(*e);
  strings.insert(strings.end(), environment.begin(), environment.end());
  std::vector<char*> env;
  for (std::string& s : strings) env.push_back(s.data());
  env.push_back(nullptr);
  std::string program = RankProgram();
  std::string timeout = std::to_string(timeout_seconds);
  char* argv[] = {program.data(), timeout.data(), nullptr};
  pid_t pid = -1;
  EXPECT_EQ(posix_spawn(&pid, program.c_str(), nullptr, nullptr, argv, env.data()), 0) << program;
  return pid;
}

// The exit code of `pid`, or -1 if it had not exited within `timeout` (it is then killed).
int WaitForExit(pid_t pid, std::chrono::seconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    int status = 0;
    if (waitpid(pid, &status, WNOHANG) == pid) return WIFEXITED(status) ? WEXITSTATUS(status) : -2;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  kill(pid, SIGKILL);
  waitpid(pid, nullptr, 0);
  return -1;
}

// Every visible GPU's rank in its own process; `id_setting` names the id file or the id.
void RunGroup(const std::string& id_setting) {
  const int n = VisibleGpus();
  std::vector<pid_t> ranks;
  for (int rank = 0; rank < n; ++rank) {
    ranks.push_back(
        Start({std::string(comm::kRankEnv) + "=" + std::to_string(rank),
               std::string(comm::kWorldSizeEnv) + "=" + std::to_string(n),
               std::string(comm::kCudaDeviceEnv) + "=" + std::to_string(rank), id_setting}));
  }
  for (int rank = 0; rank < n; ++rank) {
    EXPECT_EQ(WaitForExit(ranks[rank], std::chrono::seconds(120)), 0) << "rank " << rank;
  }
}

TEST(NcclProcessesTest, OneProcessPerGpuMeetsThroughAnIdFile) {
  if (VisibleGpus() < 2) GTEST_SKIP() << "needs 2 GPUs";
  const std::string path = FreshPath("nccl-id");
  RunGroup(std::string(comm::kNcclIdFileEnv) + "=" + path);
  std::filesystem::remove(path);
}

TEST(NcclProcessesTest, OneProcessPerGpuMeetsThroughAnIdInTheEnvironment) {
  if (VisibleGpus() < 2) GTEST_SKIP() << "needs 2 GPUs";
  ncclUniqueId id;
  ASSERT_EQ(ncclGetUniqueId(&id), ncclSuccess);
  RunGroup(std::string(comm::kNcclIdEnv) + "=" + comm::EncodeNcclUniqueId(id));
}

// Rank 1 of 2 waits for an id file that rank 0 never writes: it must give up when its group
// timeout (5 s here) passes, not hang.
TEST(NcclProcessesTest, ARankWhosePeersNeverComeFails) {
  if (VisibleGpus() < 2) GTEST_SKIP() << "needs 2 GPUs";
  const pid_t lonely =
      Start({std::string(comm::kRankEnv) + "=1", std::string(comm::kWorldSizeEnv) + "=2",
             std::string(comm::kCudaDeviceEnv) + "=1",
             std::string(comm::kNcclIdFileEnv) + "=" + FreshPath("nccl-id-never")},
            /*timeout_seconds=*/5);
  EXPECT_EQ(WaitForExit(lonely, std::chrono::seconds(30)), 1);
}

}  // namespace
}  // namespace moeserve::engine::parallel
