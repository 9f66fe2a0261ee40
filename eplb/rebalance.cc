#include "eplb/rebalance.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <span>

#include "absl/strings/str_cat.h"
#include "eplb/packing.h"

namespace moeserve::eplb {
namespace {

// One layer's placement before log2phy is built: the expert and replica rank of every slot,
// and the replica count of every expert.
struct LayerPlacement {
  std::vector<int> phy2log;
  std::vector<int> replica_rank_of_slot;
  std::vector<int> logcnt;
};

// The hierarchical procedure for one layer. The global policy is this with one group and one
// node, exactly as in the reference.
LayerPlacement PlaceLayer(std::span<const float> loads, int num_replicas, int num_groups,
                          int num_nodes, int num_gpus) {
  const int num_experts = static_cast<int>(loads.size());
  const int experts_per_group = num_experts / num_groups;
  const int groups_per_node = num_groups / num_nodes;
  const int experts_per_node = num_experts / num_nodes;
  const int slots_per_node = num_replicas / num_nodes;
  const int gpus_per_node = num_gpus / num_nodes;
  const int slots_per_gpu = num_replicas / num_gpus;

  // Step 1: pack whole groups onto nodes by group load. Summing in double and rounding once
  // makes the group load independent of summation order.
  std::vector<float> group_loads(num_groups);
  for (int group = 0; group < num_groups; ++group) {
    double sum = 0.0;
    for (int i = 0; i < experts_per_group; ++i) sum += loads[group * experts_per_group + i];
    group_loads[group] = static_cast<float>(sum);
  }
  const PackAssignment group_to_node = BalancedPacking(group_loads, num_nodes);

  // Renumber experts node by node ("node-major" order): node n owns the contiguous range
  // [n*experts_per_node, (n+1)*experts_per_node), its groups in in-node rank order.
  std::vector<int> expert_of_node_major_index(num_experts);
  for (int group = 0; group < num_groups; ++group) {
    const int first_index =
        (group_to_node.pack_of_item[group] * groups_per_node + group_to_node.rank_in_pack[group]) *
        experts_per_group;
    for (int i = 0; i < experts_per_group; ++i) {
      expert_of_node_major_index[first_index + i] = group * experts_per_group + i;
    }
  }

  LayerPlacement placement;
  placement.phy2log.resize(num_replicas);
  placement.replica_rank_of_slot.resize(num_replicas);
  placement.logcnt.resize(num_experts);

  std::vector<float> node_expert_loads(experts_per_node);
  std::vector<float> replica_loads(slots_per_node);
  for (int node = 0; node < num_nodes; ++node) {
    const int* node_experts = &expert_of_node_major_index[node * experts_per_node];
    for (int local = 0; local < experts_per_node; ++local) {
      node_expert_loads[local] = loads[node_experts[local]];
    }

    // Step 2: every node gets the same number of slots, so the same number of redundant ones.
    const Replication replication = ReplicateExperts(node_expert_loads, slots_per_node);

    // Step 3: pack the node's replicas onto its GPUs by load per replica.
    for (int slot = 0; slot < slots_per_node; ++slot) {
      const int local = replication.expert_of_slot[slot];
      replica_loads[slot] =
          node_expert_loads[local] / static_cast<float>(replication.replica_count[local]);
    }
    const PackAssignment replica_to_gpu = BalancedPacking(replica_loads, gpus_per_node);

    for (int slot = 0; slot < slots_per_node; ++slot) {
      const int physical_slot = node * slots_per_node +
                                replica_to_gpu.pack_of_item[slot] * slots_per_gpu +
                                replica_to_gpu.rank_in_pack[slot];
      placement.phy2log[physical_slot] = node_experts[replication.expert_of_slot[slot]];
      placement.replica_rank_of_slot[physical_slot] = replication.replica_rank_of_slot[slot];
    }
    for (int local = 0; local < experts_per_node; ++local) {
      placement.logcnt[node_experts[local]] = replication.replica_count[local];
    }
  }
  return placement;
}

absl::Status CheckPositive(const char* name, int value) {
  if (value >= 1) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(name, " must be at least 1, got ", value));
}

}  // namespace

std::string_view RebalancePolicyName(RebalancePolicy policy) {
  switch (policy) {
    case RebalancePolicy::kHierarchical:
      return "hierarchical";
    case RebalancePolicy::kGlobal:
      return "global";
  }
  return "unknown";
}

RebalancePolicy ChoosePolicy(const ClusterShape& shape) {
  return shape.num_groups % shape.num_nodes == 0 ? RebalancePolicy::kHierarchical
                                                 : RebalancePolicy::kGlobal;
}

absl::Status ValidateRebalanceInput(const std::vector<std::vector<float>>& weight,
                                    const ClusterShape& shape) {
  if (weight.empty()) {
    return absl::InvalidArgumentError("weight has no layers; expected [layers][experts] loads");
  }
  const size_t num_experts = weight.front().size();
  if (num_experts == 0) {
    return absl::InvalidArgumentError(
        "weight rows are empty; every layer needs one load per "
        "logical expert");
  }
  for (size_t layer = 0; layer < weight.size(); ++layer) {
    const std::vector<float>& row = weight[layer];
    if (row.size() != num_experts) {
      return absl::InvalidArgumentError(absl::StrCat("weight is ragged: layer ", layer, " has ",
                                                     row.size(), " loads but layer 0 has ",
                                                     num_experts));
    }
    double layer_total = 0.0;
    for (size_t expert = 0; expert < row.size(); ++expert) {
      const float load = row[expert];
      if (!std::isfinite(load) || load < 0.0f) {
        return absl::InvalidArgumentError(absl::StrCat("weight[", layer, "][", expert, "] is ",
                                                       load,
                                                       "; loads must be finite and non-negative"));
      }
      layer_total += load;
    }
    // Pack loads are float32 sums; keep them finite so comparisons stay meaningful.
    if (layer_total > FLT_MAX) {
      return absl::InvalidArgumentError(
          absl::StrCat("layer ", layer, " has total load ", layer_total,
                       ", beyond the float32 range; scale the loads down"));
    }
  }

  for (const auto& [name, value] :
       {std::pair{"num_replicas", shape.num_replicas}, std::pair{"num_groups", shape.num_groups},
        std::pair{"num_nodes", shape.num_nodes}, std::pair{"num_gpus", shape.num_gpus}}) {
    if (absl::Status status = CheckPositive(name, value); !status.ok()) return status;
  }
  if (shape.num_replicas > kMaxReplicas) {
    return absl::InvalidArgumentError(absl::StrCat("num_replicas is ", shape.num_replicas,
                                                   "; at most ", kMaxReplicas, " are supported"));
  }
  if (shape.num_replicas % shape.num_gpus != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_replicas (", shape.num_replicas, ") must be a multiple of num_gpus (",
                     shape.num_gpus, ") so every GPU holds the same number of slots"));
  }
  if (static_cast<size_t>(shape.num_replicas) < num_experts) {
    return absl::InvalidArgumentError(absl::StrCat("num_replicas (", shape.num_replicas,
                                                   ") must be at least the number of "
                                                   "logical experts (",
                                                   num_experts, ") so every expert gets a slot"));
  }
  const long long phy2log_entries = static_cast<long long>(weight.size()) * shape.num_replicas;
  if (phy2log_entries > kMaxTableEntries) {
    return absl::InvalidArgumentError(absl::StrCat("layers x num_replicas is ", phy2log_entries,
                                                   "; at most ", kMaxTableEntries,
                                                   " slots are supported in one call"));
  }

  if (ChoosePolicy(shape) == RebalancePolicy::kHierarchical) {
    if (num_experts % shape.num_groups != 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "hierarchical policy (num_groups % num_nodes == 0): the number of logical experts (",
          num_experts, ") must be a multiple of num_groups (", shape.num_groups, ")"));
    }
    if (shape.num_gpus % shape.num_nodes != 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "hierarchical policy (num_groups % num_nodes == 0): num_gpus (", shape.num_gpus,
          ") must be a multiple of num_nodes (", shape.num_nodes, ")"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<ExpertPlacementPlan> RebalanceExperts(const std::vector<std::vector<float>>& weight,
                                                     const ClusterShape& shape) {
  if (absl::Status status = ValidateRebalanceInput(weight, shape); !status.ok()) return status;

  ExpertPlacementPlan plan;
  plan.policy = ChoosePolicy(shape);
  plan.num_layers = static_cast<int>(weight.size());
  plan.num_logical_experts = static_cast<int>(weight.front().size());
  plan.num_physical_experts = shape.num_replicas;
  plan.num_gpus = shape.num_gpus;
  const bool hierarchical = plan.policy == RebalancePolicy::kHierarchical;
  const int num_groups = hierarchical ? shape.num_groups : 1;
  const int num_nodes = hierarchical ? shape.num_nodes : 1;

  std::vector<std::vector<int>> replica_ranks(plan.num_layers);
  plan.phy2log.resize(plan.num_layers);
  plan.logcnt.resize(plan.num_layers);
  for (int layer = 0; layer < plan.num_layers; ++layer) {
    LayerPlacement placement =
        PlaceLayer(weight[layer], shape.num_replicas, num_groups, num_nodes, shape.num_gpus);
    plan.phy2log[layer] = std::move(placement.phy2log);
    plan.logcnt[layer] = std::move(placement.logcnt);
    replica_ranks[layer] = std::move(placement.replica_rank_of_slot);
    for (const int count : plan.logcnt[layer]) {
      plan.max_replica_count = std::max(plan.max_replica_count, count);
    }
  }

  const long long log2phy_entries =
      static_cast<long long>(plan.num_layers) * plan.num_logical_experts * plan.max_replica_count;
  if (log2phy_entries > kMaxTableEntries) {
    return absl::InvalidArgumentError(
        absl::StrCat("the padded log2phy table would hold ", log2phy_entries, " entries (limit ",
                     kMaxTableEntries, "); use fewer layers or redundant slots per call"));
  }
  plan.log2phy.resize(plan.num_layers);
  for (int layer = 0; layer < plan.num_layers; ++layer) {
    std::vector<int>& row = plan.log2phy[layer];
    row.assign(static_cast<size_t>(plan.num_logical_experts) * plan.max_replica_count, -1);
    for (int slot = 0; slot < plan.num_physical_experts; ++slot) {
      row[plan.phy2log[layer][slot] * plan.max_replica_count + replica_ranks[layer][slot]] = slot;
    }
  }
  return plan;
}

}  // namespace moeserve::eplb
