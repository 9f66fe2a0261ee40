// Integration tests of a failed expert-parallel group, through the real `moeserve serve` on
// loopback, as a client sees it: a rank that fails its step (or stops arriving at collectives)
// fails its group within a second — requests in flight end UNAVAILABLE naming the group and
// the reason, new requests get UNAVAILABLE, grpc.health.v1 answers NOT_SERVING for the server
// and the group's own service name, moeserve_group_healthy{group} drops to 0, and the reason is
// logged once. Faults are injected with the hidden `--inject-fault GROUP:RANK:STEP[:hang]`.
#include <atomic>
#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "gtest/gtest.h"
#include "moeserve/v1/generation.grpc.pb.h"
#include "tests/integration/server_process.h"

namespace moeserve::testing {
namespace {

using ::testing::HasSubstr;
using Clock = std::chrono::steady_clock;
using HealthStatus = grpc::health::v1::HealthCheckResponse::ServingStatus;

struct Outcome {
  grpc::Status status;
  int tokens = 0;
  Clock::time_point ended;
};

// A long greedy generation that the fault interrupts.
Outcome LongGeneration(ServerProcess& server, int salt) {
  auto stub = v1::Generation::NewStub(server.channel());
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  v1::GenerateRequest request;
  request.set_text("request " + std::to_string(salt));
  request.set_max_tokens(400);
  request.set_ignore_eos(true);
  auto reader = stub->Generate(&context, request);
  Outcome outcome;
  v1::GenerateResponse response;
  while (reader->Read(&response)) outcome.tokens += response.token_ids_size();
  outcome.status = reader->Finish();
  outcome.ended = Clock::now();
  return outcome;
}

// Polls `service` until it is NOT_SERVING; returns when it became so (or a time 10 s later).
Clock::time_point WaitNotServing(ServerProcess& server, const std::string& service) {
  const auto give_up = Clock::now() + std::chrono::seconds(10);
  while (Clock::now() < give_up) {
    if (Health(server, service) == grpc::health::v1::HealthCheckResponse::NOT_SERVING) {
      return Clock::now();
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return Clock::now();
}

int CountOccurrences(const std::string& text, const std::string& needle) {
  int count = 0;
  for (size_t at = text.find(needle); at != std::string::npos; at = text.find(needle, at + 1)) {
    ++count;
  }
  return count;
}

// Drives a server whose `group` fails mid-stream and checks what clients see.
void ExpectGroupFailureIsVisible(ServerProcess& server, const std::string& group,
                                 const std::vector<std::string>& healthy_groups,
                                 const std::string& reason) {
  ASSERT_TRUE(server.ok());
  const std::string group_service = "moeserve.v1.Generation/" + group;
  EXPECT_EQ(Health(server, ""), grpc::health::v1::HealthCheckResponse::SERVING);
  EXPECT_EQ(Health(server, group_service), grpc::health::v1::HealthCheckResponse::SERVING);
  EXPECT_EQ(MetricValue(ScrapeMetrics(server.metrics_port()),
                        "moeserve_group_healthy{group=\"" + group + "\"}"),
            1);

  constexpr int kRequests = 6;
  std::vector<Outcome> outcomes(kRequests);
  std::vector<std::thread> clients;
  for (int i = 0; i < kRequests; ++i) {
    clients.emplace_back([&, i] { outcomes[i] = LongGeneration(server, i); });
  }
  const Clock::time_point server_down = WaitNotServing(server, "");
  for (auto& client : clients) client.join();

  // Every in-flight request ended UNAVAILABLE, naming the group and the reason; none hung.
  Clock::time_point first_end = outcomes[0].ended, last_end = outcomes[0].ended;
  for (int i = 0; i < kRequests; ++i) {
    SCOPED_TRACE("request " + std::to_string(i));
    EXPECT_EQ(outcomes[i].status.error_code(), grpc::StatusCode::UNAVAILABLE)
        << outcomes[i].status.error_message();
    EXPECT_THAT(outcomes[i].status.error_message(), HasSubstr("group `" + group + "` failed"));
    EXPECT_THAT(outcomes[i].status.error_message(), HasSubstr(reason));
    EXPECT_LT(outcomes[i].tokens, 400);
    first_end = std::min(first_end, outcomes[i].ended);
    last_end = std::max(last_end, outcomes[i].ended);
  }
  // Within a second of the failure: the requests have ended and health says so.
  EXPECT_LT(last_end - first_end, std::chrono::seconds(1));
  EXPECT_LT(server_down - first_end, std::chrono::seconds(1));
  EXPECT_EQ(Health(server, ""), grpc::health::v1::HealthCheckResponse::NOT_SERVING);
  EXPECT_EQ(Health(server, "moeserve.v1.Generation"),
            grpc::health::v1::HealthCheckResponse::NOT_SERVING);
  EXPECT_EQ(Health(server, group_service), grpc::health::v1::HealthCheckResponse::NOT_SERVING);
  EXPECT_EQ(Health(server, "readiness"), grpc::health::v1::HealthCheckResponse::NOT_SERVING);
  // In one process nothing but a restart brings the group back: liveness ends too (the watch
  // looks once a second).
  const Clock::time_point not_live = WaitNotServing(server, "liveness");
  EXPECT_LT(not_live - first_end, std::chrono::seconds(3));
  EXPECT_THAT(server.output(),
              HasSubstr("liveness NOT_SERVING: only a restart brings back the failed group `" +
                        group + "`"));
  for (const std::string& healthy : healthy_groups) {
    EXPECT_EQ(Health(server, "moeserve.v1.Generation/" + healthy),
              grpc::health::v1::HealthCheckResponse::SERVING)
        << healthy;
  }

  // New requests are refused at once with the group's failure.
  auto stub = v1::Generation::NewStub(server.channel());
  grpc::Status refused;
  const auto before = Clock::now();
  GreedyTokens(*stub, "after the failure", 4, &refused);
  EXPECT_LT(Clock::now() - before, std::chrono::seconds(5));
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_THAT(refused.error_message(), HasSubstr("group `" + group + "` failed"));
  EXPECT_THAT(refused.error_message(), HasSubstr(reason));

  const std::string metrics = ScrapeMetrics(server.metrics_port());
  EXPECT_EQ(MetricValue(metrics, "moeserve_group_healthy{group=\"" + group + "\"}"), 0);
  for (const std::string& healthy : healthy_groups) {
    EXPECT_EQ(MetricValue(metrics, "moeserve_group_healthy{group=\"" + healthy + "\"}"), 1);
  }
  EXPECT_EQ(MetricValue(metrics, "moeserve_running_requests"), 0);
  EXPECT_EQ(MetricValue(metrics, "moeserve_waiting_requests"), 0);
  EXPECT_EQ(MetricValue(metrics, "moeserve_kv_cache_usage_ratio"), 0);
  // The reason is logged once, however many ranks saw the failure.
  EXPECT_EQ(CountOccurrences(server.output(), "group `" + group + "` failed"), 1)
      << server.output();

  // The process stays up and still drains and exits cleanly.
  server.Signal(SIGTERM);
  EXPECT_EQ(server.WaitForExit(30), 0);
}

TEST(GroupFailure, AFailedRankStepFailsItsGroupVisibly) {
  ServerProcess server({"--ep", "2", "--min-step-ms", "20", "--inject-fault", "mixed:1:40"});
  ExpectGroupFailureIsVisible(server, "mixed", {}, "rank 1: injected fault at step 40");
}

TEST(GroupFailure, ARankThatStopsArrivingFailsItsGroupAfterTheCollectiveTimeout) {
  ServerProcess server({"--prefill-ep", "1", "--decode-ep", "2", "--min-step-ms", "20",
                        "--collective-timeout-seconds", "0.5", "--inject-fault",
                        "decode:1:30:hang"});
  ExpectGroupFailureIsVisible(server, "decode", {"prefill"}, "did not reach a collective");
}

TEST(GroupFailure, AFaultForAGroupTheLayoutLacksIsRefused) {
  ServerProcess server({"--ep", "2", "--inject-fault", "decode:0:1"}, /*expect_ready=*/false);
  EXPECT_EQ(server.WaitForExit(30), 1);
  EXPECT_THAT(server.output(), HasSubstr("--inject-fault names group `decode`"));
}

}  // namespace
}  // namespace moeserve::testing
