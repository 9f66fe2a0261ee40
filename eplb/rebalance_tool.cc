#include "eplb/rebalance_tool.h"

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "eplb/balancedness.h"
#include "eplb/rebalance.h"
#include "eplb/rebalance_jsonl.h"

namespace moeserve::eplb {
namespace {

bool IsBlank(std::string_view line) {
  return line.find_first_not_of(" \t\r\n") == std::string_view::npos;
}

void WriteSummary(const RebalanceCase& rebalance_case, const ExpertPlacementPlan& plan,
                  std::ostream& summary) {
  // Both measurements take validated input, so they cannot fail here; report it if they do.
  const absl::StatusOr<std::vector<LayerBalance>> before =
      MeasureStaticBalance(rebalance_case.weight, plan.num_gpus);
  const absl::StatusOr<std::vector<LayerBalance>> after =
      MeasureBalance(rebalance_case.weight, plan.phy2log, plan.num_gpus);
  if (!before.ok() || !after.ok()) {
    summary << "case " << rebalance_case.id_json << ": cannot measure balancedness: "
            << (before.ok() ? after.status() : before.status()).message() << "\n";
    return;
  }
  summary << absl::StrFormat(
      "case %s: %s policy, %d layers x %d experts, %d slots on %d GPUs\n"
      "  balancedness = mean/max GPU load; before = one replica per expert, in id order\n"
      "  %5s  %8s  %8s  %14s  %14s\n",
      rebalance_case.id_json, RebalancePolicyName(plan.policy), plan.num_layers,
      plan.num_logical_experts, plan.num_physical_experts, plan.num_gpus, "layer", "before",
      "after", "max_gpu_before", "max_gpu_after");
  for (int layer = 0; layer < plan.num_layers; ++layer) {
    const LayerBalance& old_balance = (*before)[layer];
    const LayerBalance& new_balance = (*after)[layer];
    summary << absl::StrFormat("  %5d  %8.4f  %8.4f  %14.6g  %14.6g\n", layer,
                               old_balance.balancedness(), new_balance.balancedness(),
                               old_balance.max_gpu_load, new_balance.max_gpu_load);
  }
  summary << absl::StrFormat("  %5s  %8.4f  %8.4f\n", "mean", AverageBalancedness(*before),
                             AverageBalancedness(*after));
}

}  // namespace

absl::StatusOr<RebalanceToolStats> RunRebalanceTool(std::istream& input, std::ostream& output,
                                                    std::ostream* summary) {
  RebalanceToolStats stats;
  std::string line;
  std::string result;
  int line_number = 0;
  while (std::getline(input, line)) {
    ++line_number;
    if (IsBlank(line)) continue;
    ++stats.num_cases;
    result.clear();

    RebalanceCase rebalance_case;
    const absl::Status parsed = ParseRebalanceCase(line, &rebalance_case);
    const absl::StatusOr<ExpertPlacementPlan> plan =
        parsed.ok() ? RebalanceExperts(rebalance_case.weight, rebalance_case.shape)
                    : absl::StatusOr<ExpertPlacementPlan>(parsed);
    if (plan.ok()) {
      AppendPlanLine(rebalance_case.id_json, *plan, &result);
      if (summary != nullptr) WriteSummary(rebalance_case, *plan, *summary);
    } else {
      ++stats.num_failed_cases;
      const std::string message = absl::StrCat("line ", line_number, ": ", plan.status().message());
      AppendErrorLine(rebalance_case.id_json, message, &result);
      if (summary != nullptr) {
        *summary << "case " << rebalance_case.id_json << ": error: " << message << "\n";
      }
    }
    output.write(result.data(), static_cast<std::streamsize>(result.size()));
    if (!output) return absl::UnavailableError("cannot write the output");
  }
  if (input.bad()) {
    return absl::DataLossError(absl::StrCat("reading the input failed after line ", line_number));
  }
  output.flush();
  if (!output) return absl::UnavailableError("cannot write the output");
  return stats;
}

}  // namespace moeserve::eplb
