#include "engine/placement/expert_load.h"

#include "prometheus/family.h"

namespace moeserve::engine {

ExpertLoadRecorder::ExpertLoadRecorder(int num_moe_layers, int num_logical,
                                       const std::string& group, prometheus::Registry* registry)
    : num_layers_(num_moe_layers),
      num_logical_(num_logical),
      counts_(new std::atomic<int64_t>[static_cast<size_t>(num_moe_layers) * num_logical]),
      group_(group) {
  const size_t size = static_cast<size_t>(num_moe_layers) * num_logical;
  for (size_t i = 0; i < size; ++i) counts_[i] = 0;
  if (registry == nullptr) return;
  family_ = &prometheus::BuildCounter()
                 .Name("moeserve_expert_tokens_total")
                 .Help("Tokens processed per MoE layer and logical expert (EPLB input)")
                 .Register(*registry);
  counters_.reset(new std::atomic<prometheus::Counter*>[size]);
  for (size_t i = 0; i < size; ++i) counters_[i] = nullptr;
}

void ExpertLoadRecorder::Record(int moe_layer, int logical_expert, int64_t tokens) {
  const size_t index = static_cast<size_t>(moe_layer) * num_logical_ + logical_expert;
  counts_[index].fetch_add(tokens, std::memory_order_relaxed);
  if (family_ != nullptr) {
    Series(index, moe_layer, logical_expert).Increment(static_cast<double>(tokens));
  }
}

void ExpertLoadRecorder::Expose(int moe_layer, int logical_expert) {
  if (family_ == nullptr) return;
  Series(static_cast<size_t>(moe_layer) * num_logical_ + logical_expert, moe_layer, logical_expert);
}

prometheus::Counter& ExpertLoadRecorder::Series(size_t index, int moe_layer, int logical_expert) {
  prometheus::Counter* counter = counters_[index].load(std::memory_order_acquire);
  if (counter != nullptr) return *counter;
  absl::MutexLock lock(&add_mutex_);
  counter = counters_[index].load(std::memory_order_relaxed);
  if (counter == nullptr) {
    counter = &family_->Add({{"group", group_},
                             {"layer", std::to_string(moe_layer)},
                             {"expert", std::to_string(logical_expert)}});
    counters_[index].store(counter, std::memory_order_release);
  }
  return *counter;
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
