#include "eplb/balancedness.h"

#include <algorithm>
#include <numeric>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace moeserve::eplb {
namespace {

LayerBalance SummarizeGpuLoads(const std::vector<double>& gpu_loads) {
  LayerBalance balance;
  balance.max_gpu_load = *std::max_element(gpu_loads.begin(), gpu_loads.end());
  balance.mean_gpu_load =
      std::accumulate(gpu_loads.begin(), gpu_loads.end(), 0.0) / gpu_loads.size();
  return balance;
}

absl::Status CheckRectangular(const std::vector<std::vector<float>>& weight) {
  if (weight.empty() || weight.front().empty()) {
    return absl::InvalidArgumentError("weight must have at least one layer and one expert");
  }
  for (size_t layer = 0; layer < weight.size(); ++layer) {
    if (weight[layer].size() != weight.front().size()) {
      return absl::InvalidArgumentError(absl::StrCat("weight is ragged: layer ", layer, " has ",
                                                     weight[layer].size(), " loads, layer 0 has ",
                                                     weight.front().size()));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::vector<LayerBalance>> MeasureBalance(
    const std::vector<std::vector<float>>& weight, const std::vector<std::vector<int>>& phy2log,
    int num_gpus) {
  if (absl::Status status = CheckRectangular(weight); !status.ok()) return status;
  if (num_gpus < 1) return absl::InvalidArgumentError("num_gpus must be at least 1");
  if (phy2log.size() != weight.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("phy2log has ", phy2log.size(), " layers but weight has ", weight.size()));
  }
  const int num_experts = static_cast<int>(weight.front().size());
  std::vector<LayerBalance> balances;
  balances.reserve(weight.size());
  std::vector<int> replica_count(num_experts);
  std::vector<double> gpu_loads(num_gpus);
  for (size_t layer = 0; layer < weight.size(); ++layer) {
    const std::vector<int>& slots = phy2log[layer];
    if (slots.empty() || slots.size() % num_gpus != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("phy2log layer ", layer, " has ", slots.size(),
                       " slots, not a positive multiple of num_gpus (", num_gpus, ")"));
    }
    std::fill(replica_count.begin(), replica_count.end(), 0);
    for (const int expert : slots) {
      if (expert < 0 || expert >= num_experts) {
        return absl::InvalidArgumentError(absl::StrCat("phy2log layer ", layer, " names expert ",
                                                       expert, "; valid ids are 0..",
                                                       num_experts - 1));
      }
      ++replica_count[expert];
    }
    for (int expert = 0; expert < num_experts; ++expert) {
      if (replica_count[expert] == 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("phy2log layer ", layer, " has no slot for expert ", expert));
      }
    }
    const size_t slots_per_gpu = slots.size() / num_gpus;
    std::fill(gpu_loads.begin(), gpu_loads.end(), 0.0);
    for (size_t slot = 0; slot < slots.size(); ++slot) {
      const int expert = slots[slot];
      gpu_loads[slot / slots_per_gpu] +=
          static_cast<double>(weight[layer][expert]) / replica_count[expert];
    }
    balances.push_back(SummarizeGpuLoads(gpu_loads));
  }
  return balances;
}

absl::StatusOr<std::vector<LayerBalance>> MeasureStaticBalance(
    const std::vector<std::vector<float>>& weight, int num_gpus) {
  if (absl::Status status = CheckRectangular(weight); !status.ok()) return status;
  if (num_gpus < 1) return absl::InvalidArgumentError("num_gpus must be at least 1");
  const long long num_experts = static_cast<long long>(weight.front().size());
  std::vector<LayerBalance> balances;
  balances.reserve(weight.size());
  std::vector<double> gpu_loads(num_gpus);
  for (const std::vector<float>& row : weight) {
    std::fill(gpu_loads.begin(), gpu_loads.end(), 0.0);
    for (long long expert = 0; expert < num_experts; ++expert) {
      gpu_loads[expert * num_gpus / num_experts] += row[expert];
    }
    balances.push_back(SummarizeGpuLoads(gpu_loads));
  }
  return balances;
}

double AverageBalancedness(std::span<const LayerBalance> layers) {
  if (layers.empty()) return 1.0;
  double sum = 0.0;
  for (const LayerBalance& layer : layers) sum += layer.balancedness();
  return sum / layers.size();
}

}  // namespace moeserve::eplb
