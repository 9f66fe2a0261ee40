// The controller's reading of Prometheus answers: strict about labels, values and duplicates,
// because a load matrix built from a misread answer moves experts for nothing.
#include <string>

#include "eplb/controller.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moeserve::eplb {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

std::string Series(const std::string& layer, const std::string& expert, const std::string& value) {
  return R"({"metric": {"layer": ")" + layer + R"(", "expert": ")" + expert +
         R"("}, "value": [1700000000.5, ")" + value + R"("]})";
}

std::string Answer(const std::string& series) {
  return R"({"status": "success", "data": {"resultType": "vector", "result": [)" + series + "]}}";
}

// A complete answer for 1 layer x 2 experts, with the second series replaced by `second`.
absl::StatusOr<LoadMatrix> WithSecond(const std::string& second) {
  return ParsePrometheusLoad(Answer(Series("0", "0", "5") + ", " + second), "mixed", 1, 2);
}

TEST(PrometheusLoad, ReadsACompleteAnswer) {
  absl::StatusOr<LoadMatrix> load = WithSecond(Series("0", "1", "2.5e1"));
  ASSERT_TRUE(load.ok()) << load.status();
  EXPECT_THAT((*load)[0], ElementsAre(5.0f, 25.0f));
}

TEST(PrometheusLoad, LabelsMustBePlainDecimalIntegers) {
  // `1abc` used to be read as 1 (std::stoi stops at the first non-digit).
  for (const char* label : {"1abc", "+1", " 1", "1 ", "1e0", "0x1", "", "-0", "1.0"}) {
    SCOPED_TRACE(label);
    const absl::StatusOr<LoadMatrix> load = WithSecond(Series("0", label, "2"));
    ASSERT_FALSE(load.ok());
    EXPECT_EQ(load.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(load.status().message(), HasSubstr("plain decimal integers"));
  }
  const absl::StatusOr<LoadMatrix> missing =
      WithSecond(R"({"metric": {"layer": "0"}, "value": [1, "2"]})");
  EXPECT_THAT(missing.status().message(), HasSubstr("plain decimal integers"));
}

TEST(PrometheusLoad, DuplicateSeriesAreRefused) {
  // Two series for one (layer, expert) used to be taken silently, the last one winning.
  const absl::StatusOr<LoadMatrix> load = ParsePrometheusLoad(
      Answer(Series("0", "0", "5") + ", " + Series("0", "1", "2") + ", " + Series("0", "1", "7")),
      "mixed", 1, 2);
  ASSERT_FALSE(load.ok());
  EXPECT_EQ(load.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(load.status().message(), HasSubstr("two series for layer 0 expert 1"));
}

TEST(PrometheusLoad, ValuesMustBeFiniteCounts) {
  for (const char* value : {"NaN", "+Inf", "-Inf", "-1", "abc", ""}) {
    SCOPED_TRACE(value);
    const absl::StatusOr<LoadMatrix> load = WithSecond(Series("0", "1", value));
    ASSERT_FALSE(load.ok());
    EXPECT_THAT(load.status().message(), HasSubstr("is not a finite count"));
  }
}

TEST(PrometheusLoad, PartialOutOfShapeAndMalformedAnswersAreRefused) {
  EXPECT_THAT(ParsePrometheusLoad(Answer(Series("0", "0", "5")), "mixed", 1, 2).status().message(),
              HasSubstr("partial data: Prometheus has 1 of 2"));
  EXPECT_THAT(WithSecond(Series("3", "1", "2")).status().message(), HasSubstr("outside the model"));
  EXPECT_THAT(ParsePrometheusLoad(R"({"status": "error", "error": "bad query"})", "mixed", 1, 2)
                  .status()
                  .message(),
              HasSubstr("Prometheus query failed"));
  EXPECT_THAT(
      ParsePrometheusLoad(R"({"status": "success", "data": {}})", "mixed", 1, 2).status().message(),
      HasSubstr("no `data.result` array"));
  EXPECT_THAT(WithSecond(R"({"metric": {"layer": "0", "expert": "1"}, "value": [1, 2]})")
                  .status()
                  .message(),
              HasSubstr("unexpected Prometheus answer"));
  const std::string deep = std::string(100000, '[') + std::string(100000, ']');
  EXPECT_FALSE(
      ParsePrometheusLoad(R"({"status": "success", "data": )" + deep + "}", "mixed", 1, 2).ok());
}

}  // namespace
}  // namespace moeserve::eplb
