// The body of `moeserve-eplb rebalance`: reads rebalance cases as JSON Lines, runs
// RebalanceExperts on each, writes one result line per case in input order, and optionally a
// human-readable balancedness report.
//
// Callers: eplb/moeserve_eplb_main.cc (the command line), the benchmark and tests, which run it
// on in-memory streams. A bad case never stops the run: it becomes an error line.
//
// Thread-safety: RunRebalanceTool is safe to call concurrently on distinct streams.

#ifndef MOESERVE_EPLB_REBALANCE_TOOL_H_
#define MOESERVE_EPLB_REBALANCE_TOOL_H_

#include <istream>
#include <ostream>

#include "absl/status/statusor.h"

namespace moeserve::eplb {

struct RebalanceToolStats {
  int num_cases = 0;         // non-blank input lines
  int num_failed_cases = 0;  // of which produced an error line
};

// Processes every line of `input`; blank lines are skipped and produce no output. Writes result
// lines to `output`. When `summary` is not null, writes per-layer balancedness (mean/max GPU
// load) before (the static one-replica-per-expert placement) and after rebalancing.
// Returns an error only when `output` cannot be written or `input` fails mid-read.
absl::StatusOr<RebalanceToolStats> RunRebalanceTool(std::istream& input, std::ostream& output,
                                                    std::ostream* summary);

}  // namespace moeserve::eplb

#endif  // MOESERVE_EPLB_REBALANCE_TOOL_H_
