// The JSON Lines format of `moeserve-eplb rebalance` and the tool body on in-memory streams:
// what is accepted, what each error says, and that output lines parse back to the plan.

#include "eplb/rebalance_jsonl.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "eplb/rebalance_tool.h"
#include "nlohmann/json.hpp"

namespace moeserve::eplb {
namespace {

using nlohmann::json;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

constexpr char kExampleLine[] =
    R"({"id": "example", "weight": [[90,132,40,61,104,165,39,4,73,56,183,86],)"
    R"([20,107,104,64,19,197,187,157,172,86,16,27]], "num_replicas": 16, "num_groups": 4,)"
    R"( "num_nodes": 2, "num_gpus": 8})";

TEST(ParseRebalanceCaseTest, ReadsTheExample) {
  RebalanceCase parsed;
  ASSERT_TRUE(ParseRebalanceCase(kExampleLine, &parsed).ok());
  EXPECT_EQ(parsed.id_json, "\"example\"");
  ASSERT_EQ(parsed.weight.size(), 2u);
  EXPECT_EQ(parsed.weight[0].size(), 12u);
  EXPECT_EQ(parsed.weight[1][5], 197.0f);
  EXPECT_EQ(parsed.shape.num_replicas, 16);
  EXPECT_EQ(parsed.shape.num_groups, 4);
  EXPECT_EQ(parsed.shape.num_nodes, 2);
  EXPECT_EQ(parsed.shape.num_gpus, 8);
}

TEST(ParseRebalanceCaseTest, IdIsAnyJsonValueAndOptional) {
  const std::string rest =
      R"("weight": [[1.5, 2e1]], "num_replicas": 2, "num_groups": 1, "num_nodes": 1,)"
      R"( "num_gpus": 1})";
  RebalanceCase parsed;
  ASSERT_TRUE(ParseRebalanceCase("{" + rest, &parsed).ok());
  EXPECT_EQ(parsed.id_json, "null");
  EXPECT_THAT(parsed.weight[0], ElementsAre(1.5f, 20.0f));
  ASSERT_TRUE(ParseRebalanceCase(R"({"id": 7, )" + rest, &parsed).ok());
  EXPECT_EQ(parsed.id_json, "7");
  ASSERT_TRUE(ParseRebalanceCase(R"({"id": {"layer set": [1, 2]}, )" + rest, &parsed).ok());
  EXPECT_EQ(parsed.id_json, R"({"layer set":[1,2]})");
}

TEST(ParseRebalanceCaseTest, ExplainsEveryMalformedLine) {
  const std::string counts = R"("num_replicas": 2, "num_groups": 1, "num_nodes": 1, "num_gpus": 1)";
  struct Case {
    std::string line;
    const char* fragment;
  };
  const std::vector<Case> cases = {
      {"not json", "invalid JSON"},
      {R"({"weight": [[1, 2]], )", "invalid JSON"},
      {"[1, 2]", "must be a JSON object"},
      {R"({"weight": [[1, 2]], "num_replica": 2, )" + counts + "}",
       "unknown field \"num_replica\""},
      {R"({"num_replicas": 2, "num_groups": 1, "num_nodes": 1, "num_gpus": 1})",
       "missing field \"weight\""},
      {R"({"weight": [[1, 2]], "num_groups": 1, "num_nodes": 1, "num_gpus": 1})",
       "missing field \"num_replicas\""},
      {R"({"weight": 5, )" + counts + "}", "weight must be an array"},
      {R"({"weight": [1, 2], )" + counts + "}", "weight[0] must be an array"},
      {R"({"weight": [[1, "2"]], )" + counts + "}", "weight[0][1] must be a number"},
      {R"({"weight": [[1, null]], )" + counts + "}", "weight[0][1] must be a number"},
      {R"({"weight": [[1, 1e39]], )" + counts + "}", "outside the float32 range"},
      {R"({"weight": [[1, 1e400]], )" + counts + "}", "number overflow"},
      {R"({"weight": [[1, 2]], "num_replicas": 2.5, "num_groups": 1, "num_nodes": 1,)"
       R"( "num_gpus": 1})",
       "num_replicas must be a JSON integer"},
      {R"({"weight": [[1, 2]], "num_replicas": "2", "num_groups": 1, "num_nodes": 1,)"
       R"( "num_gpus": 1})",
       "num_replicas must be a JSON integer"},
      {R"({"weight": [[1, 2]], "num_replicas": 2, "num_groups": 1, "num_nodes": 1,)"
       R"( "num_gpus": 99999999999})",
       "num_gpus is too large"},
      {R"({"weight": [[1, 2]], "num_replicas": 2, "num_groups": -99999999999, "num_nodes": 1,)"
       R"( "num_gpus": 1})",
       "num_groups is too small"},
  };
  for (const Case& bad : cases) {
    RebalanceCase parsed;
    const absl::Status status = ParseRebalanceCase(bad.line, &parsed);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << bad.line;
    EXPECT_THAT(status.message(), HasSubstr(bad.fragment)) << bad.line;
  }
}

TEST(ParseRebalanceCaseTest, RejectsDeepNestingInsteadOfOverflowingTheStack) {
  // Regression: a million nested brackets used to crash the tool inside the JSON library.
  const std::string deep = std::string(1000000, '[') + std::string(1000000, ']');
  RebalanceCase parsed;
  const absl::Status status = ParseRebalanceCase(deep, &parsed);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("nested more than"));
  const std::string deep_id =
      R"({"id": )" + std::string(100000, '[') + std::string(100000, ']') + R"(, "weight": []})";
  EXPECT_THAT(ParseRebalanceCase(deep_id, &parsed).message(), HasSubstr("nested more than"));
  // Brackets inside strings do not count, escaped quotes do not end a string.
  const std::string in_string = R"({"id": "\"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[)"
                                R"([[[[[[[[[[[[[[[[[[[[", "weight": [[1]], "num_replicas": 1,)"
                                R"( "num_groups": 1, "num_nodes": 1, "num_gpus": 1})";
  EXPECT_TRUE(ParseRebalanceCase(in_string, &parsed).ok());
}

TEST(ParseRebalanceCaseTest, KeepsTheIdWhenTheRestIsInvalid) {
  RebalanceCase parsed;
  EXPECT_FALSE(ParseRebalanceCase(R"({"id": "layer-7", "weight": 3})", &parsed).ok());
  EXPECT_EQ(parsed.id_json, "\"layer-7\"");
}

// True when both parsers read the same case; bitwise on loads so -0.0 and 0.0 differ.
void ExpectSameCase(const RebalanceCase& fast, const RebalanceCase& general,
                    const std::string& line) {
  EXPECT_EQ(fast.id_json, general.id_json) << line;
  EXPECT_EQ(fast.shape.num_replicas, general.shape.num_replicas) << line;
  EXPECT_EQ(fast.shape.num_groups, general.shape.num_groups) << line;
  EXPECT_EQ(fast.shape.num_nodes, general.shape.num_nodes) << line;
  EXPECT_EQ(fast.shape.num_gpus, general.shape.num_gpus) << line;
  ASSERT_EQ(fast.weight.size(), general.weight.size()) << line;
  for (size_t layer = 0; layer < fast.weight.size(); ++layer) {
    ASSERT_EQ(fast.weight[layer].size(), general.weight[layer].size()) << line;
    for (size_t expert = 0; expert < fast.weight[layer].size(); ++expert) {
      const float a = fast.weight[layer][expert];
      const float b = general.weight[layer][expert];
      EXPECT_TRUE(a == b && std::signbit(a) == std::signbit(b))
          << line << ": weight[" << layer << "][" << expert << "] " << a << " vs " << b;
    }
  }
}

// Whatever the fast reader accepts, the general parser must accept and read identically.
// Returns whether the fast reader accepted the line.
bool CheckReadersAgree(const std::string& line) {
  RebalanceCase fast;
  if (!internal::TryParseCommonRebalanceCase(line, &fast)) return false;
  RebalanceCase general;
  const absl::Status status = internal::ParseRebalanceCaseGeneral(line, &general);
  EXPECT_TRUE(status.ok()) << "fast reader accepted what the JSON library rejects: " << line << " ("
                           << status << ")";
  if (status.ok()) ExpectSameCase(fast, general, line);
  return true;
}

TEST(CommonCaseReaderTest, ReadsTypicalLinesWithoutTheGeneralParser) {
  EXPECT_TRUE(CheckReadersAgree(kExampleLine));
  EXPECT_TRUE(
      CheckReadersAgree(R"({"num_gpus":32,"num_nodes":4,"num_groups":8,"num_replicas":288,"id":17,)"
                        R"("weight":[[0.5,1e3,2.25E-2,0,-0,12345678901234567890],[]]})"));
  EXPECT_TRUE(
      CheckReadersAgree("\t{ \"id\" : null , \"weight\" : [ [ 1 , 2 ] ] , \"num_replicas\" : 2 , "
                        "\"num_groups\" : 1 , \"num_nodes\" : 1 , \"num_gpus\" : -3 }  \r"));
}

TEST(CommonCaseReaderTest, DeclinesWhatItCannotReadExactly) {
  const std::string counts = R"("num_replicas": 2, "num_groups": 1, "num_nodes": 1, "num_gpus": 1)";
  const std::vector<std::string> declined = {
      R"({"id": "a\"b", "weight": [[1]], )" + counts + "}",            // escape in id
      R"({"id": "caf\u00e9", "weight": [[1]], )" + counts + "}",       // escape in id
      "{\"id\": \"caf\xc3\xa9\", \"weight\": [[1]], " + counts + "}",  // non-ASCII id
      R"({"id": -0, "weight": [[1]], )" + counts + "}",                // the library prints 0
      R"({"id": 1.5, "weight": [[1]], )" + counts + "}",               // float id formatting
      R"({"id": [1], "weight": [[1]], )" + counts + "}",               // structured id
      R"({"weight": [[1]], "weight": [[2]], )" + counts + "}",         // duplicate field
      R"({"weight": [[1e400]], )" + counts + "}",                      // overflow: error
      R"({"weight": [[1e39]], )" + counts + "}",                       // beyond float32: error
      R"({"weight": [[1e-400]], )" + counts + "}",                     // underflow
      R"({"weight": [[01]], )" + counts + "}",                         // not JSON
      R"({"weight": [[1.]], )" + counts + "}",                         // not JSON
      R"({"weight": [[+1]], )" + counts + "}",                         // not JSON
      R"({"weight": [[1]], )" + counts + "} x",                        // trailing garbage
      R"({"weight": [[1]], "num_replicas": 2})",                       // missing fields
      R"({"weight": [[1]], "num_replicas": 2.0, "num_groups": 1, "num_nodes": 1,)"
      R"( "num_gpus": 1})",
      "\xef\xbb\xbf{\"weight\": [[1]], " + counts + "}",  // byte order mark
  };
  for (const std::string& line : declined) {
    RebalanceCase parsed;
    EXPECT_FALSE(internal::TryParseCommonRebalanceCase(line, &parsed)) << line;
  }
}

TEST(CommonCaseReaderTest, AgreesWithTheJsonLibraryOnRandomlyDamagedLines) {
  const std::string base =
      R"({"id": "case-1", "weight": [[1.5, 0, 2e3], [-0.0, 7, 1E-2]], "num_replicas": 6,)"
      R"( "num_groups": 1, "num_nodes": 1, "num_gpus": 2})";
  const std::string alphabet = "{}[],:\" -+.eE0123456789ainulx\\";
  std::mt19937 generator(123);
  int accepted = 0;
  for (int trial = 0; trial < 20000; ++trial) {
    std::string line = base;
    const int edits = std::uniform_int_distribution<int>(1, 3)(generator);
    for (int edit = 0; edit < edits; ++edit) {
      const size_t position = std::uniform_int_distribution<size_t>(0, line.size())(generator);
      const char character =
          alphabet[std::uniform_int_distribution<size_t>(0, alphabet.size() - 1)(generator)];
      switch (std::uniform_int_distribution<int>(0, 2)(generator)) {
        case 0:
          line.insert(position, 1, character);
          break;
        case 1:
          if (position < line.size()) line.erase(position, 1);
          break;
        default:
          if (position < line.size()) line[position] = character;
          break;
      }
    }
    if (CheckReadersAgree(line)) ++accepted;
    if (testing::Test::HasFailure()) break;
  }
  // Many damaged lines stay valid (a digit changed, a space added); they must have been read.
  EXPECT_GT(accepted, 1000);
}

TEST(AppendPlanLineTest, ParsesBackToThePlan) {
  RebalanceCase parsed;
  ASSERT_TRUE(ParseRebalanceCase(kExampleLine, &parsed).ok());
  const absl::StatusOr<ExpertPlacementPlan> plan = RebalanceExperts(parsed.weight, parsed.shape);
  ASSERT_TRUE(plan.ok());
  std::string line;
  AppendPlanLine(parsed.id_json, *plan, &line);
  ASSERT_FALSE(line.empty());
  EXPECT_EQ(line.back(), '\n');
  EXPECT_EQ(line.find('\n'), line.size() - 1) << "exactly one line";
  const json output = json::parse(line);
  EXPECT_EQ(output["id"], "example");
  EXPECT_EQ(output["phy2log"].get<std::vector<std::vector<int>>>(), plan->phy2log);
  EXPECT_EQ(output["logcnt"].get<std::vector<std::vector<int>>>(), plan->logcnt);
  const auto log2phy = output["log2phy"].get<std::vector<std::vector<std::vector<int>>>>();
  ASSERT_EQ(log2phy.size(), 2u);
  for (int layer = 0; layer < 2; ++layer) {
    ASSERT_EQ(log2phy[layer].size(), 12u);
    for (int expert = 0; expert < 12; ++expert) {
      ASSERT_EQ(log2phy[layer][expert].size(), 2u);
      for (int rank = 0; rank < 2; ++rank) {
        EXPECT_EQ(log2phy[layer][expert][rank], plan->Log2Phy(layer, expert, rank));
      }
    }
  }
}

TEST(AppendPlanLineTest, FitsItsBufferAtEveryNumberWidth) {
  // The writer sizes its buffer from the digits of num_replicas; check the edges where the
  // width grows, with one hot expert so that logcnt and the slot ids reach num_replicas.
  for (const int num_replicas : {1, 2, 9, 10, 11, 99, 100, 101, 999, 1000, 10000, kMaxReplicas}) {
    std::vector<float> loads = {1000, 0};
    if (num_replicas == 1) loads.pop_back();  // one slot holds only one expert
    const absl::StatusOr<ExpertPlacementPlan> plan = RebalanceExperts(
        {loads}, {.num_replicas = num_replicas, .num_groups = 1, .num_nodes = 1, .num_gpus = 1});
    ASSERT_TRUE(plan.ok()) << plan.status();
    std::string line = "prefix";
    AppendPlanLine("-1234", *plan, &line);
    ASSERT_EQ(line.substr(0, 6), "prefix");
    const json output = json::parse(line.substr(6));
    EXPECT_EQ(output["id"], -1234);
    EXPECT_EQ(output["phy2log"].get<std::vector<std::vector<int>>>(), plan->phy2log);
    EXPECT_EQ(output["logcnt"].get<std::vector<std::vector<int>>>(), plan->logcnt);
    EXPECT_EQ(output["log2phy"][0][0].size(), static_cast<size_t>(plan->max_replica_count));
  }
}

TEST(AppendErrorLineTest, EscapesTheMessage) {
  std::string line;
  AppendErrorLine("3", "bad \"quote\"\nand newline \x01", &line);
  EXPECT_EQ(line.find('\n'), line.size() - 1) << "the newline in the message must be escaped";
  const json output = json::parse(line);
  EXPECT_EQ(output["id"], 3);
  EXPECT_EQ(output["error"], "bad \"quote\"\nand newline \x01");
}

TEST(RunRebalanceToolTest, WritesOneLinePerCaseInOrderAndGoesOnAfterErrors) {
  std::istringstream input(std::string(kExampleLine) + "\n" +
                           R"({"id": "ragged", "weight": [[1, 2], [3]], "num_replicas": 2,)"
                           R"( "num_groups": 1, "num_nodes": 1, "num_gpus": 1})"
                           "\n\n   \r\n{broken\n" +
                           R"({"id": 4, "weight": [[5, 1]], "num_replicas": 4, "num_groups": 1,)"
                           R"( "num_nodes": 1, "num_gpus": 2})"
                           "\r\n");
  std::ostringstream output;
  std::ostringstream summary;
  const absl::StatusOr<RebalanceToolStats> stats = RunRebalanceTool(input, output, &summary);
  ASSERT_TRUE(stats.ok()) << stats.status();
  EXPECT_EQ(stats->num_cases, 4);
  EXPECT_EQ(stats->num_failed_cases, 2);

  std::istringstream lines(output.str());
  std::vector<json> results;
  for (std::string line; std::getline(lines, line);) results.push_back(json::parse(line));
  ASSERT_EQ(results.size(), 4u);
  EXPECT_EQ(results[0]["id"], "example");
  EXPECT_EQ(results[0]["phy2log"][0][0], 5);
  EXPECT_EQ(results[1]["id"], "ragged");
  EXPECT_THAT(results[1]["error"].get<std::string>(), HasSubstr("line 2: weight is ragged"));
  EXPECT_TRUE(results[2]["id"].is_null());
  EXPECT_THAT(results[2]["error"].get<std::string>(), HasSubstr("line 5: invalid JSON"));
  EXPECT_EQ(results[3]["id"], 4);
  // 5 and 1 with two extra slots: expert 0 gets both (5 > 1, then 2.5 > 1).
  EXPECT_EQ(results[3]["logcnt"], json::parse("[[3, 1]]"));

  EXPECT_THAT(summary.str(), HasSubstr("case \"example\": hierarchical policy"));
  EXPECT_THAT(summary.str(), HasSubstr("case \"ragged\": error: line 2"));
  EXPECT_THAT(summary.str(), HasSubstr("case 4: hierarchical policy, 1 layers x 2 experts"));
}

TEST(RunRebalanceToolTest, ReportsAnUnwritableOutput) {
  std::istringstream input(kExampleLine);
  std::ostringstream output;
  output.setstate(std::ios::badbit);
  EXPECT_FALSE(RunRebalanceTool(input, output, nullptr).ok());
}

}  // namespace
}  // namespace moeserve::eplb
