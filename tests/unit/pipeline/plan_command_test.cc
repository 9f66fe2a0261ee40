#include "engine/pipeline/plan_command.h"

#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_split.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moeserve::engine::pipeline {
namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;

PlanPipelineOptions Options(std::string algorithm, std::string ranks, std::string chunks) {
  PlanPipelineOptions options;
  options.algorithm = std::move(algorithm);
  options.ranks = std::move(ranks);
  options.chunks = std::move(chunks);
  return options;
}

PlanPipelineOptions WithTimes(PlanPipelineOptions options, std::string times) {
  options.times = std::move(times);
  return options;
}

std::vector<std::string> Lines(const std::string& text) { return absl::StrSplit(text, '\n'); }

TEST(RunPlanPipelineTest, PrintsScheduleRankTableAndCostTable) {
  std::ostringstream out;
  PlanPipelineOptions options = Options("dualpipe", "8", "20");
  ASSERT_TRUE(RunPlanPipeline(options, out).ok());
  const std::vector<std::string> lines = Lines(out.str());
  ASSERT_GT(lines.size(), 30u);
  EXPECT_EQ(lines[0], "schedule: dualpipe, 8 ranks, 8 stages, 20 chunks");
  for (int rank = 0; rank < 8; ++rank) {
    EXPECT_THAT(lines[1 + rank], StartsWith("rank " + std::to_string(rank) + ": F"));
  }
  EXPECT_THAT(lines[1], HasSubstr("[F0.7|B1.3]"));
  EXPECT_EQ(lines[10], "timeline: makespan 66 at F=1,B=2,W=1,FB=3,P2P=0");
  EXPECT_THAT(lines[11], HasSubstr("peak_activations"));
  // rank 3: finish 66, busy 60, bubble 6, peak PP+1 = 9, F&B = N-3H+h+1-1 = 11.
  EXPECT_THAT(lines[15], testing::MatchesRegex(R"( +3 +66 +60 +6 +9 +11)"));
  EXPECT_THAT(out.str(), HasSubstr("costs: 8 ranks, 20 chunks"));
  EXPECT_THAT(out.str(), testing::ContainsRegex(R"(1f1b +8 +\(PP-1\)\(F\+B\) +21 +21)"));
  EXPECT_THAT(out.str(), testing::ContainsRegex(R"(zb1p +8 +\(PP-1\)\(F\+B-2W\) +7 +7)"));
  EXPECT_THAT(out.str(),
              testing::ContainsRegex(R"(dualpipe +8 +\(PP/2-1\)\(F&B\+B-3W\) +6 +6 +2x +PP\+1=9)"));
  EXPECT_THAT(out.str(),
              testing::ContainsRegex(R"(dualpipev +16 +\(PP/2-1\)\(F&B\+B-3W\) +14 +14)"));
}

TEST(RunPlanPipelineTest, ForwardOnlyPrintsNoBackwards) {
  std::ostringstream out;
  PlanPipelineOptions options = Options("dualpipev", "4", "8");
  options.forward_only = true;
  ASSERT_TRUE(RunPlanPipeline(options, out).ok());
  const std::vector<std::string> lines = Lines(out.str());
  EXPECT_EQ(lines[0], "schedule: dualpipev, 4 ranks, 8 stages, 8 chunks, forward only");
  for (int rank = 0; rank < 4; ++rank) {
    EXPECT_THAT(lines[1 + rank], testing::Not(HasSubstr("B")));
    EXPECT_THAT(lines[1 + rank], testing::Not(HasSubstr("W")));
  }
}

TEST(RunPlanPipelineTest, BadArgumentsAreInvalidArgumentWithAReason) {
  struct Case {
    PlanPipelineOptions options;
    const char* message;
  };
  const Case cases[] = {
      {Options("", "8", "20"), "--algo is required"},
      {Options("gpipe", "8", "20"), "unknown pipeline algorithm"},
      {Options("dualpipe", "", "20"), "--ranks is required"},
      {Options("dualpipe", "eight", "20"), "positive integer"},
      {Options("dualpipe", "8", "-4"), "positive integer"},
      {Options("dualpipe", "7", "20"), "even number of ranks"},
      {Options("dualpipe", "8", "10"), "at least 16"},
      {WithTimes(Options("dualpipe", "8", "20"), "F=1,Q=2"), "unknown key"},
  };
  for (const Case& bad : cases) {
    std::ostringstream out;
    absl::Status status = RunPlanPipeline(bad.options, out);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << bad.message;
    EXPECT_THAT(status.message(), HasSubstr(bad.message));
    EXPECT_TRUE(out.str().empty()) << "nothing is printed on error";
  }
}

// Runs `command_line` through a CLI::App wired exactly as the main binary wires it.
struct CommandOutcome {
  int exit_code = 0;
  std::string stdout_text;
  std::string stderr_text;
};

CommandOutcome RunCommand(const std::string& command_line) {
  CommandOutcome outcome;
  CLI::App app;
  auto* plan = app.add_subcommand("plan", "Plan parallel layouts");
  RegisterPlanPipelineCommand(*plan, outcome.exit_code);
  testing::internal::CaptureStdout();
  testing::internal::CaptureStderr();
  app.parse(command_line, /*program_name_included=*/false);
  outcome.stdout_text = testing::internal::GetCapturedStdout();
  outcome.stderr_text = testing::internal::GetCapturedStderr();
  return outcome;
}

TEST(RegisterPlanPipelineCommandTest, RunsThePipelineSubcommand) {
  CommandOutcome outcome =
      RunCommand("plan pipeline --algo 1f1b --ranks 4 --chunks 8 --times F=1,B=2,W=1,FB=3");
  EXPECT_EQ(outcome.exit_code, 0);
  EXPECT_THAT(outcome.stdout_text, StartsWith("schedule: 1f1b, 4 ranks, 4 stages, 8 chunks\n"
                                              "rank 0: F0.0 F0.1 F0.2 F0.3 B0.0 F0.4"));
  EXPECT_THAT(outcome.stdout_text, HasSubstr("timeline: makespan 33 "));
  EXPECT_TRUE(outcome.stderr_text.empty());
}

TEST(RegisterPlanPipelineCommandTest, BadArgumentSetsExitCodeTwoAndExplains) {
  CommandOutcome outcome = RunCommand("plan pipeline --algo dualpipe --ranks 7 --chunks 20");
  EXPECT_EQ(outcome.exit_code, 2);
  EXPECT_TRUE(outcome.stdout_text.empty());
  EXPECT_THAT(outcome.stderr_text,
              StartsWith("moeserve plan pipeline: dualpipe needs an even number of ranks"));
  EXPECT_THAT(outcome.stderr_text, HasSubstr("--help"));
}

TEST(RegisterPlanPipelineCommandTest, UnwritableTraceIsExitCodeOne) {
  CommandOutcome outcome = RunCommand(
      "plan pipeline --algo dualpipe --ranks 4 --chunks 8 --trace /nonexistent-directory/t.json");
  EXPECT_EQ(outcome.exit_code, 1);
  EXPECT_THAT(outcome.stderr_text, HasSubstr("/nonexistent-directory/t.json"));
}

}  // namespace
}  // namespace moeserve::engine::pipeline
