// Integration tests of expert-parallel serving: disaggregated prefill/decode groups with
// redundant experts and two-batch overlap give the single-rank tokens; traces show the overlap;
// EP metrics are exported; bad layouts are refused with clear messages.
#include <signal.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <thread>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "moeserve/v1/generation.grpc.pb.h"
#include "nlohmann/json.hpp"
#include "tests/integration/server_process.h"

namespace moeserve::testing {
namespace {

using ::testing::HasSubstr;

// Greedy tokens of `count` concurrent requests of 12 to 16 tokens.
std::vector<std::vector<uint32_t>> ConcurrentGreedy(ServerProcess& server, int count) {
  return testing::ConcurrentGreedy(server, count, [](int i) { return 12 + i % 5; });
}

TEST(ExpertParallelServing, DisaggregatedGroupsGiveTheSingleRankTokens) {
  std::vector<std::vector<uint32_t>> single, parallel;
  {
    ServerProcess server({});
    ASSERT_TRUE(server.ok());
    single = ConcurrentGreedy(server, 16);
  }
  {
    ServerProcess server({"--prefill-ep", "2", "--decode-ep", "8", "--num-redundant-experts", "8",
                          "--two-batch-overlap", "--overlap-min-tokens", "1"});
    ASSERT_TRUE(server.ok());
    parallel = ConcurrentGreedy(server, 16);
    auto stub = v1::Generation::NewStub(server.channel());
    grpc::ClientContext context;
    v1::ModelInfo info;
    ASSERT_TRUE(stub->GetModelInfo(&context, {}, &info).ok());
    EXPECT_EQ(info.layout().prefill_ep(), 2u);
    EXPECT_EQ(info.layout().decode_ep(), 8u);
    EXPECT_EQ(info.layout().num_redundant_experts(), 8u);
    EXPECT_TRUE(info.layout().two_batch_overlap());

    const std::string metrics = ScrapeMetrics(server.metrics_port());
    EXPECT_GT(MetricValue(metrics, "moeserve_dispatch_bytes_total{group=\"decode\"}"), 0);
    EXPECT_GT(MetricValue(metrics, "moeserve_combine_bytes_total{group=\"prefill\"}"), 0);
    const double overlap = MetricValue(metrics, "moeserve_overlap_ratio{group=\"prefill\"}");
    EXPECT_GE(overlap, 0.0);
    EXPECT_LE(overlap, 1.0);
    const double balance =
        MetricValue(metrics, "moeserve_expert_balancedness{group=\"decode\",layer=\"0\"}");
    EXPECT_GT(balance, 0.0);
    EXPECT_LE(balance, 1.0);
    // Expert-token counters: MoE layers (3) x logical experts (64) series per group.
    int series = 0;
    std::istringstream lines(metrics);
    for (std::string line; std::getline(lines, line);) {
      if (line.rfind("moeserve_expert_tokens_total{", 0) == 0 &&
          line.find("group=\"decode\"") != std::string::npos) {
        ++series;
      }
    }
    EXPECT_EQ(series, 3 * 64);
  }
  ASSERT_EQ(single.size(), parallel.size());
  for (size_t i = 0; i < single.size(); ++i) {
    EXPECT_EQ(single[i], parallel[i]) << "request " << i;
    EXPECT_EQ(single[i].size(), 12u + i % 5);
  }
}

TEST(ExpertParallelServing, ExpertMetricsCanBeTurnedOff) {
  ServerProcess server({"--ep", "2", "--no-expert-metrics"});
  ASSERT_TRUE(server.ok());
  ConcurrentGreedy(server, 2);
  const std::string metrics = ScrapeMetrics(server.metrics_port());
  EXPECT_THAT(metrics, ::testing::Not(HasSubstr("moeserve_expert_tokens_total{")));
  EXPECT_GT(MetricValue(metrics, "moeserve_dispatch_bytes_total{group=\"mixed\"}"), 0);
}

struct Interval {
  double begin, end;
};

// Per pid, the compute-lane and communication-lane intervals of a trace file, and the names of
// the step lane's events; checks the format.
void ReadTrace(const std::string& path, std::map<int, std::vector<Interval>>& compute,
               std::map<int, std::vector<Interval>>& communication,
               std::map<int, std::set<std::string>>& step_events) {
  std::ifstream in(path);
  ASSERT_TRUE(in.good()) << path;
  nlohmann::json trace = nlohmann::json::parse(in);
  ASSERT_TRUE(trace.contains("traceEvents"));
  std::set<int> named_processes;
  std::set<std::pair<int, int>> named_threads;
  for (const auto& event : trace["traceEvents"]) {
    ASSERT_TRUE(event.contains("ph") && event.contains("pid") && event.contains("tid") &&
                event.contains("name"));
    if (event["ph"] == "M") {
      if (event["name"] == "process_name") named_processes.insert(event["pid"].get<int>());
      if (event["name"] == "thread_name") {
        named_threads.insert({event["pid"].get<int>(), event["tid"].get<int>()});
      }
      ASSERT_TRUE(event["args"].contains("name"));
      continue;
    }
    ASSERT_EQ(event["ph"], "X");
    ASSERT_TRUE(event["ts"].is_number() && event["dur"].is_number());
    ASSERT_GE(event["dur"].get<double>(), 0.0);
    const int pid = event["pid"].get<int>();
    const int tid = event["tid"].get<int>();
    EXPECT_TRUE(named_processes.contains(pid)) << "metadata comes first";
    EXPECT_TRUE(named_threads.contains({pid, tid}));
    const double ts = event["ts"].get<double>();
    // Lane 2 holds the step events around both (forward, next tokens, emit).
    if (tid == 2) {
      step_events[pid].insert(event["name"].get<std::string>());
      continue;
    }
    (tid == 0 ? compute : communication)[pid].push_back({ts, ts + event["dur"].get<double>()});
  }
}

double OverlapMicroseconds(const std::map<int, std::vector<Interval>>& compute,
                           const std::map<int, std::vector<Interval>>& communication) {
  double total = 0;
  for (const auto& [pid, comm_events] : communication) {
    auto it = compute.find(pid);
    if (it == compute.end()) continue;
    for (const Interval& c : comm_events) {
      for (const Interval& k : it->second) {
        total += std::max(0.0, std::min(c.end, k.end) - std::max(c.begin, k.begin));
      }
    }
  }
  return total;
}

void RunTracedServer(const std::string& dir, bool overlap,
                     std::map<int, std::vector<Interval>>& compute,
                     std::map<int, std::vector<Interval>>& communication,
                     std::map<int, std::set<std::string>>& step_events) {
  std::filesystem::remove_all(dir);
  std::vector<std::string> args = {"--prefill-ep",         "2", "--decode-ep",   "2",
                                   "--trace-dir",          dir, "--trace-steps", "6",
                                   "--overlap-min-tokens", "1"};
  if (overlap) args.push_back("--two-batch-overlap");
  ServerProcess server(args);
  ASSERT_TRUE(server.ok());
  ConcurrentGreedy(server, 8);
  server.Signal(SIGTERM);
  ASSERT_EQ(server.WaitForExit(60), 0);
  ReadTrace(dir + "/moeserve-trace.json", compute, communication, step_events);
}

TEST(ExpertParallelServing, TraceHasRankLanesAndShowsTheOverlap) {
  const std::string base = ::testing::TempDir() + "/moeserve-trace-test";
  std::map<int, std::vector<Interval>> compute_on, communication_on, compute_off, communication_off;
  std::map<int, std::set<std::string>> steps_on, steps_off;
  RunTracedServer(base + "-on", true, compute_on, communication_on, steps_on);
  RunTracedServer(base + "-off", false, compute_off, communication_off, steps_off);
  // One process per rank: prefill ranks 0, 1 and decode ranks 1000, 1001.
  for (int pid : {0, 1, 1000, 1001}) {
    EXPECT_FALSE(compute_on[pid].empty()) << pid;
    EXPECT_FALSE(communication_on[pid].empty()) << pid;
    EXPECT_EQ(steps_on[pid], (std::set<std::string>{"forward", "next tokens", "emit"})) << pid;
  }
  EXPECT_GT(OverlapMicroseconds(compute_on, communication_on), 0.0);
  // Without overlap, communication runs between compute events, never during them.
  EXPECT_EQ(OverlapMicroseconds(compute_off, communication_off), 0.0);
}

TEST(ExpertParallelServing, GpuOnlyModelsAreRefusedOnTheCpuBeforeLoading) {
  // builtin:v3-bench's routed experts exist on GPUs only; its host weights (14 GB) are not even
  // generated on the CPU.
  ServerProcess server({"--model", "builtin:v3-bench"}, /*expect_ready=*/false);
  EXPECT_FALSE(server.ok());
  EXPECT_EQ(server.WaitForExit(10), 2);
  EXPECT_THAT(server.output(), HasSubstr("keeps its routed experts on GPUs only"));
}

TEST(ExpertParallelServing, LayoutsThatCannotWorkAreRefusedWithAReason) {
  {
    // 64 + 3 slots do not divide over 2 ranks.
    ServerProcess server({"--ep", "2", "--num-redundant-experts", "3"}, /*expect_ready=*/false);
    EXPECT_FALSE(server.ok());
    EXPECT_NE(server.WaitForExit(30), 0);
    EXPECT_THAT(server.output(), HasSubstr("do not divide over 2 ranks"));
  }
  {
    const std::string path = ::testing::TempDir() + "/bad-placement.json";
    std::ofstream(path) << R"({"version": 1, "phy2log": [[0, 1, 2]]})";
    ServerProcess server({"--ep", "2", "--placement", path}, /*expect_ready=*/false);
    EXPECT_FALSE(server.ok());
    EXPECT_NE(server.WaitForExit(30), 0);
    EXPECT_THAT(server.output(), HasSubstr("MoE layers"));
  }
}

}  // namespace
}  // namespace moeserve::testing
