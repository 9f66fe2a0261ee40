// The real `moeserve serve` started and stopped as an operator would, carelessly: a second
// server on a port already taken, signals while the model loads, a second signal during the
// drain, signals other than SIGTERM, and a signal the kernel hands to a thread moeserve did not
// create (OpenBLAS's pool).
#include <dirent.h>
#include <signal.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <future>
#include <string>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/integration/server_process.h"

namespace moeserve::testing {
namespace {

using ::testing::HasSubstr;

bool Serves(ServerProcess& server) {
  auto stub = v1::Generation::NewStub(server.channel());
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  v1::ModelInfo info;
  return stub->GetModelInfo(&context, v1::GetModelInfoRequest(), &info).ok();
}

// A greedy stream of `max_tokens` tokens in the background; `first_token` is set once the first
// message arrives.
struct BackgroundStream {
  std::promise<void> first_token;
  std::future<grpc::Status> status;
  int received = 0;

  BackgroundStream(ServerProcess& server, int max_tokens) {
    std::shared_ptr<grpc::Channel> channel = server.channel();
    status = std::async(std::launch::async, [this, channel, max_tokens] {
      auto stub = v1::Generation::NewStub(channel);
      v1::GenerateRequest request;
      request.set_text("drain me");
      request.set_max_tokens(max_tokens);
      request.set_ignore_eos(true);
      grpc::ClientContext context;
      context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
      auto reader = stub->Generate(&context, request);
      v1::GenerateResponse response;
      while (reader->Read(&response)) {
        if (received++ == 0) first_token.set_value();
      }
      if (received == 0) first_token.set_value();
      return reader->Finish();
    });
  }
};

TEST(Lifecycle, ASecondServerOnATakenPortFailsToStart) {
  ServerProcess first({});
  ASSERT_TRUE(first.ok());
  // gRPC's default SO_REUSEPORT would let this one start and take half the new connections.
  ServerProcess second({"--port", std::to_string(first.port()), "--metrics-port", "-1"},
                       /*expect_ready=*/false);
  EXPECT_FALSE(second.ok());
  EXPECT_EQ(second.WaitForExit(30), 1);
  EXPECT_THAT(
      second.output(),
      HasSubstr("cannot listen on 127.0.0.1:" + std::to_string(first.port()) + " (address in use"));
  EXPECT_TRUE(Serves(first));
  // The same for the OpenAI HTTP port (cpp-httplib sets SO_REUSEPORT by default).
  ASSERT_GT(first.http_port(), 0);
  ServerProcess third({"--http-port", std::to_string(first.http_port()), "--metrics-port", "-1"},
                      /*expect_ready=*/false);
  EXPECT_FALSE(third.ok());
  EXPECT_EQ(third.WaitForExit(30), 1);
  EXPECT_THAT(third.output(), HasSubstr("cannot listen for HTTP on 127.0.0.1:" +
                                        std::to_string(first.http_port())));
  EXPECT_TRUE(Serves(first));
}

TEST(Lifecycle, ASignalWhileTheModelLoadsStopsBeforeServing) {
  for (int signal_number : {SIGTERM, SIGINT, SIGHUP}) {
    SCOPED_TRACE(signal_number);
    ServerProcess server({"--inject-load-delay-seconds", "60"}, /*expect_ready=*/false,
                         /*wait_for_ready=*/false);
    ASSERT_TRUE(server.WaitForOutput("moeserve: loading builtin:tiny", 60)) << server.output();
    server.Signal(signal_number);
    EXPECT_EQ(server.WaitForExit(30), 0) << server.output();
    EXPECT_THAT(server.output(), HasSubstr("while loading the model; stopping before serving"));
  }
}

TEST(Lifecycle, ASecondSignalDuringTheDrainStopsAtOnceWithUnavailable) {
  ServerProcess server({"--min-step-ms", "50", "--shutdown-grace-seconds", "120"});
  ASSERT_TRUE(server.ok());
  BackgroundStream stream(server, 2000);  // 100 s at 50 ms a step: still running at the signals
  ASSERT_EQ(stream.first_token.get_future().wait_for(std::chrono::seconds(60)),
            std::future_status::ready);
  server.Signal(SIGTERM);
  ASSERT_TRUE(server.WaitForOutput("draining in-flight requests", 30)) << server.output();
  server.Signal(SIGINT);
  EXPECT_EQ(server.WaitForExit(60), 1) << server.output();
  EXPECT_THAT(server.output(), HasSubstr("received a second signal (SIGINT), stopping now"));
  ASSERT_EQ(stream.status.wait_for(std::chrono::seconds(30)), std::future_status::ready);
  const grpc::Status status = stream.status.get();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE) << status.error_message();
  EXPECT_THAT(status.error_message(), HasSubstr("the server stopped before the request finished"));
}

TEST(Lifecycle, SigusrIsIgnoredAndSighupDrains) {
  ServerProcess server({"--min-step-ms", "20", "--shutdown-grace-seconds", "60"});
  ASSERT_TRUE(server.ok());
  for (int signal_number : {SIGUSR1, SIGUSR2}) server.Signal(signal_number);
  ASSERT_TRUE(server.WaitForOutput("SIGUSR2 ignored", 30)) << server.output();
  EXPECT_TRUE(Serves(server));
  BackgroundStream stream(server, 40);
  ASSERT_EQ(stream.first_token.get_future().wait_for(std::chrono::seconds(60)),
            std::future_status::ready);
  server.Signal(SIGHUP);
  EXPECT_EQ(server.WaitForExit(60), 0) << server.output();
  const grpc::Status status = stream.status.get();
  EXPECT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(stream.received, 40);
}

// The threads of `pid` other than its main thread, as (thread id, blocks SIGTERM).
std::vector<std::pair<pid_t, bool>> OtherThreads(pid_t pid) {
  std::vector<std::pair<pid_t, bool>> threads;
  const std::string tasks = "/proc/" + std::to_string(pid) + "/task";
  DIR* directory = opendir(tasks.c_str());
  if (directory == nullptr) return threads;
  while (dirent* entry = readdir(directory)) {
    const pid_t tid = static_cast<pid_t>(atoi(entry->d_name));
    if (tid <= 0 || tid == pid) continue;
    std::ifstream status(tasks + "/" + entry->d_name + "/status");
    std::string line;
    bool blocks_sigterm = false;
    while (std::getline(status, line)) {
      if (line.rfind("SigBlk:", 0) == 0) {
        const unsigned long long mask = std::stoull(line.substr(7), nullptr, 16);
        blocks_sigterm = (mask >> (SIGTERM - 1)) & 1;
      }
    }
    threads.push_back({tid, blocks_sigterm});
  }
  closedir(directory);
  return threads;
}

TEST(Lifecycle, ASignalTakenByAThreadMoeserveDidNotCreateStillDrains) {
  // OpenBLAS starts its threads before main(), so no mask set by moeserve reaches them; the
  // kernel may hand a process signal to any of them. Send one there directly.
  ServerProcess server({"--min-step-ms", "20", "--shutdown-grace-seconds", "60"});
  ASSERT_TRUE(server.ok());
  const std::vector<std::pair<pid_t, bool>> threads = OtherThreads(server.pid());
  ASSERT_FALSE(threads.empty());
  pid_t target = threads.front().first;
  for (const auto& [tid, blocks_sigterm] : threads) {
    if (!blocks_sigterm) target = tid;
  }
  BackgroundStream stream(server, 30);
  ASSERT_EQ(stream.first_token.get_future().wait_for(std::chrono::seconds(60)),
            std::future_status::ready);
  ASSERT_EQ(syscall(SYS_tgkill, server.pid(), target, SIGTERM), 0);
  EXPECT_EQ(server.WaitForExit(60), 0) << server.output();
  EXPECT_THAT(server.output(), HasSubstr("received SIGTERM, draining"));
  const grpc::Status status = stream.status.get();
  EXPECT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(stream.received, 30);
}

}  // namespace
}  // namespace moeserve::testing
