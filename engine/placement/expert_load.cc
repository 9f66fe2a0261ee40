#include "engine/placement/expert_load.h"

#include "prometheus/family.h"

namespace moeserve::engine {

ExpertLoadRecorder::ExpertLoadRecorder(int num_moe_layers, int num_logical,
                                       const std::string& group, prometheus::Registry* registry)
    : num_layers_(num_moe_layers),
      num_logical_(num_logical),
      counts_(new std::atomic<int64_t>[static_cast<size_t>(num_moe_layers) * num_logical]) {
  for (int i = 0; i < num_moe_layers * num_logical; ++i) counts_[i] = 0;
  if (registry == nullptr) return;
  auto& family = prometheus::BuildCounter()
                     .Name("moeserve_expert_tokens_total")
                     .Help("Tokens processed per MoE layer and logical expert (EPLB input)")
                     .Register(*registry);
  for (int layer = 0; layer < num_moe_layers; ++layer) {
    for (int expert = 0; expert < num_logical; ++expert) {
      counters_.push_back(&family.Add({{"group", group},
                                       {"layer", std::to_string(layer)},
                                       {"expert", std::to_string(expert)}}));
    }
  }
}

void ExpertLoadRecorder::Record(int moe_layer, int logical_expert, int64_t tokens) {
  const size_t index = static_cast<size_t>(moe_layer) * num_logical_ + logical_expert;
  counts_[index].fetch_add(tokens, std::memory_order_relaxed);
  if (!counters_.empty()) counters_[index]->Increment(static_cast<double>(tokens));
}

std::vector<std::vector<int64_t>> ExpertLoadRecorder::Snapshot() const {
  std::vector<std::vector<int64_t>> snapshot(num_layers_, std::vector<int64_t>(num_logical_));
  for (int layer = 0; layer < num_layers_; ++layer) {
    for (int expert = 0; expert < num_logical_; ++expert) {
      snapshot[layer][expert] = counts_[static_cast<size_t>(layer) * num_logical_ + expert].load();
    }
  }
  return snapshot;
}

}  // namespace moeserve::engine
