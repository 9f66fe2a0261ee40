// TraceRecorder: the file is trace-event JSON that Perfetto and chrome://tracing open — a
// traceEvents array of complete ("X") events with pid, tid, ts and dur (microseconds), plus
// process_name / thread_name metadata ("M") events. The format is checked here by parsing the
// file, as Perfetto's own trace processor cannot run offline. An EP group's trace has one
// process per rank with compute and communication lanes, which overlap in time only when
// two-batch overlap is on.
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "engine/tools/group_logits.h"
#include "engine/trace/trace_recorder.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "parallel_test_util.h"

namespace moeserve::engine {
namespace {

using ::testing::StartsWith;

// A file name of this test alone (ctest runs the tests of this binary in parallel processes).
std::string TempPath(const std::string& name) {
  const ::testing::TestInfo* test = ::testing::UnitTest::GetInstance()->current_test_info();
  return (std::filesystem::path(::testing::TempDir()) /
          (std::string("parallel_trace_test.") + test->test_suite_name() + "." + test->name() +
           "." + std::to_string(::getpid()) + "." + name))
      .string();
}

nlohmann::json ReadJson(const std::string& path) {
  std::ifstream in(path);
  EXPECT_TRUE(in.good()) << path;
  nlohmann::json json = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  EXPECT_FALSE(json.is_discarded()) << path << " is not valid JSON";
  return json;
}

// Checks the structure every event must have and returns the events.
std::vector<nlohmann::json> CheckedEvents(const nlohmann::json& trace) {
  EXPECT_TRUE(trace.is_object());
  EXPECT_TRUE(trace.contains("traceEvents"));
  if (!trace.contains("traceEvents") || !trace["traceEvents"].is_array()) return {};
  std::vector<nlohmann::json> events;
  for (const auto& event : trace["traceEvents"]) {
    EXPECT_TRUE(event.contains("ph") && event["ph"].is_string()) << event.dump();
    EXPECT_TRUE(event.contains("pid") && event["pid"].is_number_integer()) << event.dump();
    EXPECT_TRUE(event.contains("tid") && event["tid"].is_number_integer()) << event.dump();
    EXPECT_TRUE(event.contains("name") && event["name"].is_string()) << event.dump();
    if (event.value("ph", "") == "X") {
      EXPECT_TRUE(event.contains("ts") && event["ts"].is_number()) << event.dump();
      EXPECT_TRUE(event.contains("dur") && event["dur"].is_number()) << event.dump();
      EXPECT_GE(event.value("ts", -1.0), 0.0) << event.dump();
      EXPECT_GE(event.value("dur", -1.0), 0.0) << event.dump();
    } else if (event.value("ph", "") == "M") {
      EXPECT_TRUE(event.value("name", "") == "process_name" ||
                  event.value("name", "") == "thread_name")
          << event.dump();
      EXPECT_TRUE(event.contains("args") && event["args"].contains("name") &&
                  event["args"]["name"].is_string())
          << event.dump();
    } else {
      ADD_FAILURE() << "unexpected phase: " << event.dump();
    }
    events.push_back(event);
  }
  return events;
}

TEST(TraceRecorderTest, WritesCompleteEventsAndNameMetadata) {
  TraceRecorder recorder;
  recorder.NameProcess(3, "decode rank \"3\"");
  recorder.NameThread(3, 0, "compute");
  recorder.NameThread(3, 1, "communication");
  const auto start = TraceRecorder::Clock::now();
  recorder.Complete(3, 0, "attention L0 mb0", "compute", start,
                    start + std::chrono::microseconds(1500));
  recorder.Complete(3, 1, "dispatch L1 mb0", "communication",
                    start + std::chrono::microseconds(2000),
                    start + std::chrono::microseconds(2250));
  EXPECT_EQ(recorder.num_events(), 2u);
  const std::string path = TempPath("recorder.json");
  ASSERT_TRUE(recorder.WriteJson(path).ok());

  const std::vector<nlohmann::json> events = CheckedEvents(ReadJson(path));
  ASSERT_EQ(events.size(), 5u);
  std::map<std::string, nlohmann::json> complete;
  std::string process_name;
  std::map<int, std::string> thread_names;
  for (const auto& event : events) {
    if (event["ph"] == "X") {
      complete[event["name"]] = event;
    } else if (event["name"] == "process_name") {
      EXPECT_EQ(event["pid"], 3);
      process_name = event["args"]["name"];
    } else {
      EXPECT_EQ(event["pid"], 3);
      thread_names[event["tid"].get<int>()] = event["args"]["name"];
    }
  }
  EXPECT_EQ(process_name, "decode rank \"3\"");
  EXPECT_EQ(thread_names, (std::map<int, std::string>{{0, "compute"}, {1, "communication"}}));
  ASSERT_EQ(complete.size(), 2u);
  const auto& attention = complete["attention L0 mb0"];
  const auto& dispatch = complete["dispatch L1 mb0"];
  EXPECT_EQ(attention["pid"], 3);
  EXPECT_EQ(attention["tid"], 0);
  EXPECT_EQ(attention["cat"], "compute");
  EXPECT_EQ(dispatch["tid"], 1);
  EXPECT_EQ(dispatch["cat"], "communication");
  EXPECT_NEAR(attention["dur"].get<double>(), 1500.0, 1e-3);
  EXPECT_NEAR(dispatch["dur"].get<double>(), 250.0, 1e-3);
  // Timestamps are microseconds from the recorder's origin.
  EXPECT_NEAR(dispatch["ts"].get<double>() - attention["ts"].get<double>(), 2000.0, 1e-3);
}

TEST(TraceRecorderTest, ScopedEventsFromManyThreads) {
  TraceRecorder recorder;
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&recorder, t] {
      for (int i = 0; i < 500; ++i) {
        ScopedTraceEvent event(&recorder, t / 2, t % 2, "event " + std::to_string(i), "test");
      }
    });
  }
  for (auto& thread : threads) thread.join();
  { ScopedTraceEvent no_recorder(nullptr, 0, 0, "ignored", "test"); }
  EXPECT_EQ(recorder.num_events(), 4000u);
  const std::string path = TempPath("many.json");
  ASSERT_TRUE(recorder.WriteJson(path).ok());
  const auto events = CheckedEvents(ReadJson(path));
  std::map<std::pair<int, int>, int> per_lane;
  for (const auto& event : events) ++per_lane[{event["pid"].get<int>(), event["tid"].get<int>()}];
  ASSERT_EQ(per_lane.size(), 8u);
  for (const auto& [lane, count] : per_lane) EXPECT_EQ(count, 500);
}

TEST(TraceRecorderTest, UnwritablePathIsAnError) {
  TraceRecorder recorder;
  absl::Status status = recorder.WriteJson(TempPath("no/such/directory/trace.json"));
  EXPECT_FALSE(status.ok());
}

// --- An EP group's trace ------------------------------------------------------------------------

struct Interval {
  double start, end;
  std::string name;
};

struct GroupTrace {
  std::map<int, std::string> process_names;                    // pid -> name
  std::map<std::pair<int, int>, std::string> thread_names;     // (pid, tid) -> name
  std::map<std::pair<int, int>, std::vector<Interval>> lanes;  // (pid, tid) -> events
};

GroupTrace TraceOfGroupLogits(int ep, bool overlap, int num_tokens) {
  const Model& model = parallel::testing::TinyModel();
  std::vector<int32_t> tokens;
  for (int i = 0; i < num_tokens; ++i) tokens.push_back((i * 37 + 11) % 256);
  parallel::GroupOptions options;
  options.name = "traced";
  options.size = ep;
  options.two_batch_overlap = overlap;
  options.overlap_min_tokens = 1;
  const ModelConfig& c = model.config();
  TraceRecorder recorder;
  auto result = tools::ComputeGroupLogits(
      model, tokens, options,
      ExpertPlacement::Default(c.num_moe_layers(), c.n_routed_experts, c.n_routed_experts),
      &recorder);
  EXPECT_TRUE(result.ok()) << result.status();
  const std::string path = TempPath(overlap ? "group_overlap.json" : "group.json");
  EXPECT_TRUE(recorder.WriteJson(path).ok());
  GroupTrace trace;
  for (const auto& event : CheckedEvents(ReadJson(path))) {
    const int pid = event["pid"];
    const int tid = event["tid"];
    if (event["ph"] == "M" && event["name"] == "process_name") {
      trace.process_names[pid] = event["args"]["name"];
    } else if (event["ph"] == "M") {
      trace.thread_names[{pid, tid}] = event["args"]["name"];
    } else {
      const double ts = event["ts"], dur = event["dur"];
      trace.lanes[{pid, tid}].push_back({ts, ts + dur, event["name"]});
    }
  }
  return trace;
}

// Longest time any communication event of `pid` shares with a compute event of `pid`.
double LongestLaneOverlap(const GroupTrace& trace, int pid) {
  double longest = 0;
  const auto compute = trace.lanes.find({pid, 0});
  const auto communication = trace.lanes.find({pid, 1});
  if (compute == trace.lanes.end() || communication == trace.lanes.end()) return 0;
  for (const Interval& a : communication->second) {
    for (const Interval& b : compute->second) {
      longest = std::max(longest, std::min(a.end, b.end) - std::max(a.start, b.start));
    }
  }
  return longest;
}

int CountPrefix(const std::vector<Interval>& events, const std::string& prefix) {
  int count = 0;
  for (const auto& e : events) count += e.name.rfind(prefix, 0) == 0;
  return count;
}

TEST(GroupTraceTest, OneProcessPerRankWithComputeAndCommunicationLanes) {
  constexpr int kRanks = 2;
  const ModelConfig& c = parallel::testing::TinyModel().config();
  const GroupTrace trace = TraceOfGroupLogits(kRanks, /*overlap=*/true, 64);
  ASSERT_EQ(trace.process_names.size(), static_cast<size_t>(kRanks));
  for (int rank = 0; rank < kRanks; ++rank) {
    SCOPED_TRACE("rank " + std::to_string(rank));
    EXPECT_THAT(trace.process_names.at(rank), StartsWith("traced rank " + std::to_string(rank)));
    EXPECT_EQ(trace.thread_names.at({rank, 0}), "compute");
    EXPECT_EQ(trace.thread_names.at({rank, 1}), "communication");
    const auto& compute = trace.lanes.at({rank, 0});
    const auto& communication = trace.lanes.at({rank, 1});
    // Two micro-batches: per layer and micro-batch one attention; per MoE layer and micro-batch
    // one gate, experts, shared experts, dispatch and combine.
    const int micro_batches = 2;
    EXPECT_EQ(CountPrefix(compute, "attention"), c.num_hidden_layers * micro_batches);
    EXPECT_EQ(CountPrefix(compute, "gate"), c.num_moe_layers() * micro_batches);
    EXPECT_EQ(CountPrefix(compute, "experts"), c.num_moe_layers() * micro_batches);
    EXPECT_EQ(CountPrefix(compute, "shared experts"), c.num_moe_layers() * micro_batches);
    EXPECT_EQ(CountPrefix(communication, "dispatch"), c.num_moe_layers() * micro_batches);
    EXPECT_EQ(CountPrefix(communication, "combine"), c.num_moe_layers() * micro_batches);
    std::set<std::string> names;
    for (const auto& e : communication) names.insert(e.name);
    EXPECT_TRUE(names.count("dispatch L1 mb0")) << "first MoE layer is layer 1";
    EXPECT_TRUE(names.count("combine L3 mb1"));
  }
  // No events outside the ranks' lanes.
  for (const auto& [lane, events] : trace.lanes) {
    EXPECT_LT(lane.first, kRanks);
    EXPECT_TRUE(lane.second == 0 || lane.second == 1);
  }
}

TEST(GroupTraceTest, LanesOverlapOnlyWithTwoBatchOverlap) {
  constexpr int kRanks = 2;
  // Whether the two lanes' events coincide depends on how the OS schedules the threads: on a
  // loaded machine of two cores one pass can run them in turn by chance. A few passes, each of
  // which can show it; without the overlap none can.
  constexpr int kPasses = 5;
  double best = 0;
  for (int pass = 0; pass < kPasses && best <= 1.0; ++pass) {
    const GroupTrace overlapped = TraceOfGroupLogits(kRanks, /*overlap=*/true, 64);
    for (int rank = 0; rank < kRanks; ++rank)
      best = std::max(best, LongestLaneOverlap(overlapped, rank));
  }
  EXPECT_GT(best, 1.0) << "no communication event ran while compute ran in " << kPasses
                       << " passes (microseconds)";

  const GroupTrace sequential = TraceOfGroupLogits(kRanks, /*overlap=*/false, 64);
  for (int rank = 0; rank < kRanks; ++rank) {
    EXPECT_LE(LongestLaneOverlap(sequential, rank), 1.0)
        << "rank " << rank << ": without overlap the compute thread does both in turn";
    // One micro-batch: every event names mb0.
    for (const auto& e : sequential.lanes.at({rank, 1}))
      EXPECT_THAT(e.name, ::testing::EndsWith("mb0"));
  }
}

}  // namespace
}  // namespace moeserve::engine
