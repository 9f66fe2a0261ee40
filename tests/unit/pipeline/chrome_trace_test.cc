#include "engine/pipeline/chrome_trace.h"

#include <cstdio>
#include <fstream>
#include <map>
#include <string>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moeserve::engine::pipeline {
namespace {

struct Plan {
  PipelineSchedule schedule;
  OperationDurations durations;
  SimulationResult simulation;
};

Plan MakePlan() {
  Plan plan;
  plan.schedule = *MakeDualPipeSchedule(4, 8, /*forward_only=*/false);
  plan.simulation = *SimulatePipeline(plan.schedule, plan.durations);
  return plan;
}

TEST(ChromeTraceTest, OneCompleteEventPerOperationInItsRanksLane) {
  const Plan plan = MakePlan();
  const nlohmann::json trace = BuildPipelineTrace(plan.schedule, plan.durations, plan.simulation);
  ASSERT_TRUE(trace.contains("traceEvents"));
  const nlohmann::json& events = trace["traceEvents"];
  ASSERT_TRUE(events.is_array());

  std::map<int, std::string> lane_names;
  std::map<int, int> complete_events_per_lane;
  std::map<int, double> lane_end;
  bool has_process_name = false;
  for (const nlohmann::json& event : events) {
    ASSERT_TRUE(event.contains("ph"));
    ASSERT_TRUE(event.contains("pid"));
    ASSERT_TRUE(event.contains("tid"));
    const std::string phase = event["ph"];
    if (phase == "M") {
      if (event["name"] == "process_name") has_process_name = true;
      if (event["name"] == "thread_name") lane_names[event["tid"]] = event["args"]["name"];
      continue;
    }
    ASSERT_EQ(phase, "X");
    ASSERT_TRUE(event["ts"].is_number());
    ASSERT_TRUE(event["dur"].is_number());
    ASSERT_TRUE(event["name"].is_string());
    const int lane = event["tid"];
    const double start = event["ts"];
    // Events of one lane come in time order and never overlap: a rank runs one thing at a time.
    EXPECT_GE(start, lane_end[lane]);
    lane_end[lane] = start + event["dur"].get<double>();
    ++complete_events_per_lane[lane];
  }
  EXPECT_TRUE(has_process_name);
  ASSERT_EQ(lane_names.size(), 4u);
  for (int rank = 0; rank < 4; ++rank) {
    EXPECT_EQ(lane_names[rank], "rank " + std::to_string(rank));
    EXPECT_EQ(complete_events_per_lane[rank],
              static_cast<int>(plan.schedule.rank_operations[rank].size()));
    EXPECT_DOUBLE_EQ(lane_end[rank],
                     plan.simulation.ranks[rank].finish * kTraceMicrosecondsPerTimeUnit);
  }
}

TEST(ChromeTraceTest, EventsCarryTheOperationText) {
  const Plan plan = MakePlan();
  const nlohmann::json trace = BuildPipelineTrace(plan.schedule, plan.durations, plan.simulation);
  int overlapped = 0;
  for (const nlohmann::json& event : trace["traceEvents"]) {
    if (event["ph"] != "X" || event["cat"] != "forward_backward") continue;
    ++overlapped;
    EXPECT_THAT(event["name"].get<std::string>(),
                testing::MatchesRegex(R"(\[F[01]\.[0-9]+\|B[01]\.[0-9]+\])"));
    EXPECT_DOUBLE_EQ(event["dur"].get<double>(), 3 * kTraceMicrosecondsPerTimeUnit);
  }
  EXPECT_GT(overlapped, 0);
}

TEST(ChromeTraceTest, WritesAFileThatParsesBack) {
  const Plan plan = MakePlan();
  const std::string path = testing::TempDir() + "/pipeline_trace_test.json";
  ASSERT_TRUE(WritePipelineTrace(path, plan.schedule, plan.durations, plan.simulation).ok());
  std::ifstream file(path);
  const nlohmann::json trace = nlohmann::json::parse(file);
  EXPECT_EQ(trace, BuildPipelineTrace(plan.schedule, plan.durations, plan.simulation));
  std::remove(path.c_str());
}

TEST(ChromeTraceTest, UnwritablePathIsAnErrorNamingThePath) {
  const Plan plan = MakePlan();
  absl::Status status = WritePipelineTrace("/nonexistent-directory/trace.json", plan.schedule,
                                           plan.durations, plan.simulation);
  EXPECT_FALSE(status.ok());
  EXPECT_THAT(status.message(), testing::HasSubstr("/nonexistent-directory/trace.json"));
}

}  // namespace
}  // namespace moeserve::engine::pipeline
