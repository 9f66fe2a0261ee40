// Integration tests of what an operator's tooling sees of the real `moeserve` binary: the health
// names probes use (liveness vs readiness, per group) through loading, serving and a wedged rank
// loop; the log lines (levels, JSON, one line per request at debug); the metrics dashboards read
// (TPOT, per-phase step time, length histograms, process series, loading progress); and
// `--check-flags`, which the deployment checks run on every container's command line.
#include <sys/wait.h>

#include <chrono>
#include <cstdio>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/integration/server_process.h"

namespace moeserve::testing {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
using HealthStatus = grpc::health::v1::HealthCheckResponse;
using Clock = std::chrono::steady_clock;

// Polls `service` until it reports `wanted`; whether it did within `seconds`.
bool WaitForHealth(ServerProcess& server, const std::string& service,
                   HealthStatus::ServingStatus wanted, double seconds) {
  const auto give_up = Clock::now() + std::chrono::milliseconds(static_cast<int>(seconds * 1000));
  while (Clock::now() < give_up) {
    if (Health(server, service) == wanted) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return false;
}

void Generate(ServerProcess& server, const std::string& prompt, int max_tokens) {
  auto stub = v1::Generation::NewStub(server.channel());
  grpc::Status status;
  GreedyTokens(*stub, prompt, max_tokens, &status);
  EXPECT_TRUE(status.ok()) << status.error_message();
}

TEST(HealthProbes, LivenessServesWhileLoadingAndReadinessWaitsForTheModel) {
  ServerProcess server({"--model", "builtin:tiny", "--prefill-ep", "1", "--decode-ep", "2",
                        "--inject-load-delay-seconds", "4"},
                       /*expect_ready=*/true, /*wait_for_ready=*/false);
  ASSERT_TRUE(server.WaitForLoading(60)) << server.output();
  EXPECT_EQ(Health(server, "liveness"), HealthStatus::SERVING);
  for (const char* service : {"readiness", "", "moeserve.v1.Generation",
                              "moeserve.v1.Generation/prefill", "moeserve.v1.Generation/decode"}) {
    EXPECT_EQ(Health(server, service), HealthStatus::NOT_SERVING) << service;
  }
  const std::string loading = ScrapeMetrics(server.metrics_port());
  EXPECT_EQ(MetricValue(loading, "moeserve_serving"), 0);
  EXPECT_LT(MetricValue(loading, "moeserve_model_load_progress_ratio"), 1);
  EXPECT_EQ(Health(server, "no-such-service"), HealthStatus::SERVICE_UNKNOWN);

  ASSERT_TRUE(WaitForHealth(server, "readiness", HealthStatus::SERVING, 60)) << server.output();
  for (const char* service : {"liveness", "", "moeserve.v1.Generation",
                              "moeserve.v1.Generation/prefill", "moeserve.v1.Generation/decode"}) {
    EXPECT_EQ(Health(server, service), HealthStatus::SERVING) << service;
  }
  const std::string serving = ScrapeMetrics(server.metrics_port());
  EXPECT_EQ(MetricValue(serving, "moeserve_serving"), 1);
  EXPECT_EQ(MetricValue(serving, "moeserve_model_load_progress_ratio"), 1);

  server.Signal(SIGTERM);
  EXPECT_EQ(server.WaitForExit(30), 0) << server.output();
}

TEST(HealthProbes, AWedgedRankLoopEndsLivenessButNotReadiness) {
  // One rank and no peers: the hung rank's group never fails at a collective, so only the
  // liveness watch can notice it.
  ServerProcess server({"--model", "builtin:tiny", "--ep", "1", "--inject-fault", "mixed:0:2:hang",
                        "--collective-timeout-seconds", "1", "--liveness-stall-seconds", "2"});
  ASSERT_TRUE(server.ok());
  EXPECT_EQ(Health(server, "liveness"), HealthStatus::SERVING);
  std::thread request([&] {
    auto stub = v1::Generation::NewStub(server.channel());
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(15));
    v1::GenerateRequest generate;
    generate.set_text("wedge");
    generate.set_max_tokens(50);
    v1::GenerateResponse response;
    auto reader = stub->Generate(&context, generate);
    while (reader->Read(&response)) {
    }
    reader->Finish();
  });
  const auto wedged = Clock::now();
  EXPECT_TRUE(WaitForHealth(server, "liveness", HealthStatus::NOT_SERVING, 10)) << server.output();
  EXPECT_LT(Clock::now() - wedged, std::chrono::seconds(8));
  EXPECT_EQ(Health(server, "readiness"), HealthStatus::SERVING);
  EXPECT_THAT(server.output(), HasSubstr("liveness NOT_SERVING: a rank loop has not come round"));
  server.Signal(SIGTERM);
  request.join();
  server.WaitForExit(30);
}

TEST(HealthProbes, RefusesALivenessStallShorterThanTheCollectiveTimeout) {
  ServerProcess server({"--model", "builtin:tiny", "--liveness-stall-seconds", "5",
                        "--collective-timeout-seconds", "10"},
                       /*expect_ready=*/false);
  EXPECT_EQ(server.WaitForExit(30), 2);
  EXPECT_THAT(server.output(), HasSubstr("--liveness-stall-seconds (5) must exceed"));
}

TEST(Logs, JsonLinesWithLevelsAndOneLinePerRequestAtDebug) {
  ServerProcess server({"--model", "builtin:tiny", "--log-format", "json", "--log-level", "debug"});
  ASSERT_TRUE(server.ok());
  Generate(server, "log me", 5);
  server.Signal(SIGTERM);
  ASSERT_EQ(server.WaitForExit(30), 0);
  std::istringstream lines(server.output());
  int parsed = 0, request_lines = 0;
  for (std::string line; std::getline(lines, line);) {
    if (line.empty() || line[0] != '{') continue;
    const nlohmann::json entry = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    ASSERT_FALSE(entry.is_discarded()) << line;
    ++parsed;
    for (const char* field : {"time", "level", "component", "pid", "thread", "message"}) {
      EXPECT_TRUE(entry.contains(field)) << field << " missing in " << line;
    }
    EXPECT_EQ(entry["component"], "serve");
    EXPECT_THAT(entry["time"].get<std::string>(),
                ::testing::MatchesRegex(
                    R"([0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z)"));
    const std::string message = entry["message"];
    if (message.find("request ") == 0 &&
        message.find(" finished: length, prompt ") != std::string::npos) {
      EXPECT_EQ(entry["level"], "debug");
      EXPECT_THAT(message, HasSubstr("output 5 tokens"));
      ++request_lines;
    }
  }
  EXPECT_GE(parsed, 4) << server.output();  // loading, serving, received SIGTERM, stopped
  EXPECT_EQ(request_lines, 1) << server.output();
}

TEST(Logs, TextLinesCarryTimeAndLevelAndWarnHidesInfo) {
  ServerProcess text({"--model", "builtin:tiny"});
  ASSERT_TRUE(text.ok());
  Generate(text, "no request line at info", 3);
  text.Signal(SIGTERM);
  ASSERT_EQ(text.WaitForExit(30), 0);
  EXPECT_THAT(text.output(),
              ::testing::ContainsRegex(
                  R"([0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:]{8}\.[0-9]{6}Z info  moeserve: serving)"));
  EXPECT_THAT(text.output(), Not(HasSubstr("finished: length")));

  // At warn the server prints nothing while it starts, serves and stops normally.
  ChildProcess quiet({"serve", "--model", "builtin:tiny", "--port", "0", "--metrics-port", "-1",
                      "--http-port", "-1", "--log-level", "warn"});
  std::this_thread::sleep_for(std::chrono::seconds(3));
  quiet.Signal(SIGTERM);
  EXPECT_EQ(quiet.WaitForExit(30), 0);
  EXPECT_THAT(quiet.output(), Not(HasSubstr("moeserve: serving"))) << quiet.output();
}

TEST(Metrics, RequestShapesStepPhasesAndProcessSeries) {
  ServerProcess server({"--model", "builtin:tiny", "--prefill-ep", "1", "--decode-ep", "1"});
  ASSERT_TRUE(server.ok());
  Generate(server, "count the tokens of this prompt", 8);
  // The last token's metrics are recorded just before the stream ends.
  std::string metrics;
  for (int attempt = 0; attempt < 50; ++attempt) {
    metrics = ScrapeMetrics(server.metrics_port());
    if (MetricValue(metrics, "moeserve_output_length_tokens_count") >= 1) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_EQ(MetricValue(metrics, "moeserve_output_length_tokens_count"), 1);
  EXPECT_EQ(MetricValue(metrics, "moeserve_output_length_tokens_sum"), 8);
  EXPECT_EQ(MetricValue(metrics, "moeserve_prompt_length_tokens_count"), 1);
  EXPECT_GT(MetricValue(metrics, "moeserve_prompt_length_tokens_sum"), 3);
  EXPECT_EQ(MetricValue(metrics, "moeserve_time_per_output_token_seconds_count"), 1);
  EXPECT_GT(MetricValue(metrics, "moeserve_time_per_output_token_seconds_sum"), 0);
  // Disaggregated: the prefill group's steps all prefill, the decode group's all decode.
  EXPECT_GE(MetricValue(metrics,
                        R"(moeserve_step_duration_seconds_count{group="prefill",phase="prefill"})"),
            1);
  EXPECT_GE(MetricValue(metrics,
                        R"(moeserve_step_duration_seconds_count{group="decode",phase="decode"})"),
            7);
  EXPECT_THAT(metrics, Not(HasSubstr(R"(group="prefill",phase="decode")")));
  EXPECT_THAT(metrics, Not(HasSubstr(R"(group="decode",phase="prefill")")));
  for (const char* series : {"process_cpu_seconds_total", "process_resident_memory_bytes",
                             "process_virtual_memory_bytes", "process_open_fds", "process_max_fds",
                             "process_start_time_seconds", "process_threads"}) {
    EXPECT_GT(MetricValue(metrics, series), 0) << series;
  }
  const double started = MetricValue(metrics, "process_start_time_seconds");
  const double now = static_cast<double>(std::time(nullptr));
  EXPECT_NEAR(started, now, 120);
}

// Runs `moeserve ARGS...` to its end; its exit code and output.
int RunToEnd(std::vector<std::string> args, std::string* output) {
  ChildProcess process(std::move(args));
  const int code = process.WaitForExit(60);
  *output = process.output();
  return code;
}

TEST(CheckFlags, AcceptsValidCommandLinesAndRefusesBadOnesWithoutStarting) {
  std::string output;
  EXPECT_EQ(RunToEnd({"--check-flags", "serve", "--model", "builtin:tiny", "--prefill-ep", "2",
                      "--decode-ep", "4", "--port", "50051"},
                     &output),
            0)
      << output;
  EXPECT_THAT(output, HasSubstr("moeserve serve: flags accepted"));
  // Nothing started: no port was bound, no model loaded.
  EXPECT_THAT(output, Not(HasSubstr("loading")));
  // After the subcommand too.
  EXPECT_EQ(RunToEnd({"frontend", "--group", "decode=leader:50100", "--check-flags"}, &output), 0)
      << output;
  EXPECT_NE(RunToEnd({"--check-flags", "serve", "--modle", "builtin:tiny"}, &output), 0);
  EXPECT_THAT(output, HasSubstr("--modle"));
  EXPECT_NE(RunToEnd({"--check-flags", "frontend", "--group", "decode"}, &output), 0);
  EXPECT_THAT(output, HasSubstr("--group must be NAME=HOST:PORT"));
  // A node checks its ranks' flags too.
  EXPECT_EQ(RunToEnd({"--check-flags", "node", "--ranks-per-node", "2", "--num-nodes", "2",
                      "--node-index", "1", "--", "--group", "decode", "--leader", "leader:50100",
                      "--model", "builtin:tiny"},
                     &output),
            0)
      << output;
  EXPECT_THAT(output, HasSubstr("moeserve rank: flags accepted"));
  EXPECT_NE(RunToEnd({"--check-flags", "node", "--ranks-per-node", "2", "--", "--group", "decode",
                      "--leader", "leader:50100", "--model", "builtin:tiny", "--bogus"},
                     &output),
            0);
  EXPECT_THAT(output, HasSubstr("--bogus"));
  EXPECT_NE(RunToEnd({"--check-flags", "serve", "--log-level", "chatty"}, &output), 0);
  // Options that only work together.
  EXPECT_EQ(RunToEnd({"--check-flags", "serve", "--gpu-exchange-plan", "device"}, &output), 0)
      << output;
  EXPECT_EQ(RunToEnd({"--check-flags", "serve", "--gpu-exchange-plan", "device", "--gpu-moe-plan",
                      "host"},
                     &output),
            2);
  EXPECT_THAT(output, HasSubstr("--gpu-exchange-plan device needs --gpu-moe-plan device"));
  // The dispatch's rows to FP8 experts: fp8 or bf16, on serve and on rank processes alike.
  EXPECT_EQ(RunToEnd({"--check-flags", "serve", "--gpu-dispatch-rows", "bf16"}, &output), 0)
      << output;
  EXPECT_EQ(RunToEnd({"--check-flags", "rank", "--group", "decode", "--group-size", "2", "--rank",
                      "1", "--leader", "leader:50100", "--gpu-dispatch-rows", "fp8"},
                     &output),
            0)
      << output;
  EXPECT_NE(RunToEnd({"--check-flags", "serve", "--gpu-dispatch-rows", "fp16"}, &output), 0);
  EXPECT_THAT(output, HasSubstr("--gpu-dispatch-rows: fp16 not in {fp8,bf16}"));
  // The exchange's CTA bound: NCCL's channels, or 0 for NCCL's choice.
  EXPECT_EQ(RunToEnd({"--check-flags", "serve", "--gpu-exchange-max-ctas", "8"}, &output), 0)
      << output;
  EXPECT_NE(RunToEnd({"--check-flags", "serve", "--gpu-exchange-max-ctas", "65"}, &output), 0);
  EXPECT_THAT(output, HasSubstr("--gpu-exchange-max-ctas"));
  EXPECT_NE(RunToEnd({"--check-flags", "serve", "--gpu-exchange-max-ctas", "-1"}, &output), 0);
}

}  // namespace
}  // namespace moeserve::testing
