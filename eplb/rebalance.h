// RebalanceExperts: DeepSeek's EPLB placement algorithm. Given per-layer expert loads and the
// cluster shape, it decides how many replicas each logical expert gets and which physical slot
// (hence which GPU) holds each replica, so that GPU loads even out.
//
// Callers: the `moeserve-eplb rebalance` tool, the EPLB controller, tests. Input is validated
// here (InvalidArgument with an actionable message; never a crash), so callers may pass raw
// loads straight from metrics or files.
//
// Thread-safety: RebalanceExperts is a pure function; concurrent calls are safe.

#ifndef MOESERVE_EPLB_REBALANCE_H_
#define MOESERVE_EPLB_REBALANCE_H_

#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace moeserve::eplb {

// Shape of the expert-parallel group the placement is for.
struct ClusterShape {
  int num_replicas = 0;  // physical expert slots per MoE layer, over all GPUs
  int num_groups = 0;    // expert groups (group-limited routing); contiguous runs of experts
  int num_nodes = 0;     // servers; GPUs on one node talk over NVLink
  int num_gpus = 0;      // GPUs in the group; GPU g holds slots [g*S, (g+1)*S), S = replicas/gpus
};

enum class RebalancePolicy {
  // Groups are packed onto nodes first and replicas never leave their group's node. Chosen when
  // num_groups % num_nodes == 0.
  kHierarchical,
  // One group, one node: experts are replicated and packed over all GPUs at once.
  kGlobal,
};

std::string_view RebalancePolicyName(RebalancePolicy policy);

// The policy RebalanceExperts uses for `shape`: hierarchical iff num_groups % num_nodes == 0.
// Precondition: shape.num_nodes > 0.
RebalancePolicy ChoosePolicy(const ClusterShape& shape);

// A placement for every MoE layer. Slot p of a layer lives on GPU p / slots_per_gpu().
struct ExpertPlacementPlan {
  RebalancePolicy policy = RebalancePolicy::kGlobal;
  int num_layers = 0;
  int num_logical_experts = 0;
  int num_physical_experts = 0;  // == ClusterShape::num_replicas
  int num_gpus = 0;
  // Largest replica count over all layers and experts; the row width of log2phy.
  int max_replica_count = 0;

  // phy2log[layer][slot]: the logical expert held in that physical slot.
  std::vector<std::vector<int>> phy2log;
  // log2phy[layer][expert * max_replica_count + replica_rank]: the slot holding that replica,
  // or -1 past the expert's replica count. Use Log2Phy() rather than indexing by hand.
  std::vector<std::vector<int>> log2phy;
  // logcnt[layer][expert]: how many slots hold the expert (always >= 1).
  std::vector<std::vector<int>> logcnt;

  int slots_per_gpu() const { return num_physical_experts / num_gpus; }
  int Log2Phy(int layer, int expert, int replica_rank) const {
    return log2phy[layer][expert * max_replica_count + replica_rank];
  }
};

// Largest accepted num_replicas. Real deployments use hundreds of slots per layer; the cap
// keeps a typo from allocating gigabytes.
inline constexpr int kMaxReplicas = 1 << 16;
// Largest accepted number of entries in any one output table (phy2log or padded log2phy).
inline constexpr long long kMaxTableEntries = 1LL << 24;

// Checks everything RebalanceExperts requires and returns the first violation as
// InvalidArgument, or OK. `weight` is [num_layers][num_logical_experts]:
//   - at least one layer and one expert; every row the same length;
//   - every load finite and >= 0, and each layer's total within float32 range;
//   - every count in `shape` >= 1, num_replicas <= kMaxReplicas;
//   - num_replicas % num_gpus == 0 and num_replicas >= num_logical_experts;
//   - for the hierarchical policy also num_logical_experts % num_groups == 0 and
//     num_gpus % num_nodes == 0.
absl::Status ValidateRebalanceInput(const std::vector<std::vector<float>>& weight,
                                    const ClusterShape& shape);

// Computes the placement, reproducing DeepSeek's published rebalance_experts exactly (same
// phy2log, logcnt, and replica ranks in log2phy). Loads are token counts or any non-negative
// float32 measure of work per expert; only their ratios matter. Returns InvalidArgument for
// everything ValidateRebalanceInput rejects, and also when the padded log2phy table would
// exceed kMaxTableEntries, which is known only once the replica counts are.
absl::StatusOr<ExpertPlacementPlan> RebalanceExperts(const std::vector<std::vector<float>>& weight,
                                                     const ClusterShape& shape);

}  // namespace moeserve::eplb

#endif  // MOESERVE_EPLB_REBALANCE_H_
