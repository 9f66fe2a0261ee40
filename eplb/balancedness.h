// Balancedness of an expert placement: for each MoE layer, the mean GPU load divided by the
// largest GPU load (1.0 = perfectly even; 1/num_gpus = all work on one GPU). A GPU's load is the
// sum over its slots of the slot expert's load divided by that expert's replica count, i.e.
// tokens are assumed to spread evenly over an expert's replicas.
//
// Callers: the `moeserve-eplb rebalance --summary` report, the EPLB controller (to decide
// whether a new placement is worth pushing), tests.
//
// Thread-safety: pure functions; concurrent calls are safe.

#ifndef MOESERVE_EPLB_BALANCEDNESS_H_
#define MOESERVE_EPLB_BALANCEDNESS_H_

#include <span>
#include <vector>

#include "absl/status/statusor.h"

namespace moeserve::eplb {

struct LayerBalance {
  double mean_gpu_load = 0.0;
  double max_gpu_load = 0.0;
  // mean / max; 1.0 for a layer with no load at all (nothing is imbalanced).
  double balancedness() const { return max_gpu_load > 0.0 ? mean_gpu_load / max_gpu_load : 1.0; }
};

// Balance of each layer when `phy2log[layer]` places the experts of `weight[layer]`, slot p on
// GPU p / (slots / num_gpus). InvalidArgument when the shapes disagree, num_gpus does not divide
// the slot count, an expert id is out of range, or an expert has no slot (its tokens would have
// nowhere to go).
absl::StatusOr<std::vector<LayerBalance>> MeasureBalance(
    const std::vector<std::vector<float>>& weight, const std::vector<std::vector<int>>& phy2log,
    int num_gpus);

// Balance without redundant experts: each expert has one replica, experts laid out in id order,
// expert e on GPU e * num_gpus / num_experts (the static placement a group starts with).
// InvalidArgument when `weight` is empty or ragged or num_gpus < 1.
absl::StatusOr<std::vector<LayerBalance>> MeasureStaticBalance(
    const std::vector<std::vector<float>>& weight, int num_gpus);

// Mean balancedness over layers (1.0 for no layers): one number to compare placements by.
double AverageBalancedness(std::span<const LayerBalance> layers);

}  // namespace moeserve::eplb

#endif  // MOESERVE_EPLB_BALANCEDNESS_H_
