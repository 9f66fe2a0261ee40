// The JSON Lines format of `moeserve-eplb rebalance`: parsing one input line into a rebalance
// case, and writing one output line per case (a placement or an error).
//
// Input line:  {"id": ANY, "weight": [[load, ...], ...], "num_replicas": R, "num_groups": G,
//               "num_nodes": N, "num_gpus": P}
//   id is any JSON value, echoed back as-is (null when absent); the counts are JSON integers;
//   loads are JSON numbers. Other fields are rejected so that typos surface.
// Output line: {"id": ANY, "phy2log": [[...]], "log2phy": [[[...]]], "logcnt": [[...]]}
//          or: {"id": ANY, "error": "message"}
// docs/eplb.md documents the format for users.
//
// Callers: eplb/rebalance_tool.cc and tests. Parsing checks only the JSON shape and types;
// RebalanceExperts validates the values.
//
// Thread-safety: pure functions; concurrent calls are safe.

#ifndef MOESERVE_EPLB_REBALANCE_JSONL_H_
#define MOESERVE_EPLB_REBALANCE_JSONL_H_

#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "eplb/rebalance.h"

namespace moeserve::eplb {

struct RebalanceCase {
  std::string id_json = "null";  // the "id" value, serialized as compact JSON
  std::vector<std::vector<float>> weight;
  ClusterShape shape;
};

// Parses one line into `rebalance_case`. On InvalidArgument, `rebalance_case->id_json` still
// holds the id whenever the line was a JSON object with one, so the error can be matched to it.
absl::Status ParseRebalanceCase(std::string_view line, RebalanceCase* rebalance_case);

namespace internal {
// The two halves of ParseRebalanceCase, exposed so tests can check that they agree: a fast
// reader for the common shape of line that returns false (declines) on anything else, and the
// general JSON-library parser that handles every line and writes every error message.
bool TryParseCommonRebalanceCase(std::string_view line, RebalanceCase* rebalance_case);
absl::Status ParseRebalanceCaseGeneral(std::string_view line, RebalanceCase* rebalance_case);
}  // namespace internal

// Appends `{"id":...,"phy2log":...,"log2phy":...,"logcnt":...}` and a newline to `out`.
// log2phy is written as [layers][experts][max_replica_count], padded with -1.
void AppendPlanLine(std::string_view id_json, const ExpertPlacementPlan& plan, std::string* out);

// Appends `{"id":...,"error":"<status message>"}` and a newline to `out`.
void AppendErrorLine(std::string_view id_json, std::string_view message, std::string* out);

}  // namespace moeserve::eplb

#endif  // MOESERVE_EPLB_REBALANCE_JSONL_H_
