#include "engine/parallel/parallel_metrics.h"

#include "prometheus/family.h"

namespace moeserve::engine::parallel {
namespace {

prometheus::Counter* GroupCounter(prometheus::Registry& registry, const std::string& name,
                                  const std::string& help, const std::string& group) {
  return &prometheus::BuildCounter().Name(name).Help(help).Register(registry).Add(
      {{"group", group}});
}

}  // namespace

ParallelMetrics::ParallelMetrics(const std::string& group, int num_moe_layers,
                                 prometheus::Registry* registry)
    : balancedness_(num_moe_layers, 1.0) {
  if (registry == nullptr) return;
  dispatch_bytes_ = GroupCounter(*registry, "moeserve_dispatch_bytes_total",
                                 "Bytes of token activations sent to expert ranks", group);
  combine_bytes_ = GroupCounter(*registry, "moeserve_combine_bytes_total",
                                "Bytes of expert outputs sent back to token ranks", group);
  dispatch_seconds_ = GroupCounter(*registry, "moeserve_dispatch_seconds_total",
                                   "Time spent in dispatch exchanges (per rank, summed)", group);
  combine_seconds_ = GroupCounter(*registry, "moeserve_combine_seconds_total",
                                  "Time spent in combine exchanges (per rank, summed)", group);
  exposed_seconds_ =
      GroupCounter(*registry, "moeserve_communication_exposed_seconds_total",
                   "Time compute waited for dispatch/combine (per rank, summed)", group);
  overlap_ratio_ = &prometheus::BuildGauge()
                        .Name("moeserve_overlap_ratio")
                        .Help("Share of dispatch/combine time hidden behind compute")
                        .Register(*registry)
                        .Add({{"group", group}});
  healthy_ = &prometheus::BuildGauge()
                  .Name("moeserve_group_healthy")
                  .Help("1 while the expert-parallel group serves, 0 once it failed")
                  .Register(*registry)
                  .Add({{"group", group}});
  healthy_->Set(1);
  step_graph_captures_ =
      GroupCounter(*registry, "moeserve_gpu_step_graph_captures_total",
                   "GPU steps captured as CUDA graphs (one per step shape, per rank)", group);
  step_graph_replays_ = GroupCounter(*registry, "moeserve_gpu_step_graph_replays_total",
                                     "GPU steps run from a CUDA graph captured before", group);
  exchange_overflows_ = GroupCounter(
      *registry, "moeserve_gpu_exchange_overflow_steps_total",
      "Steps redone with the host's plan because a device-planned exchange overflowed (per rank)",
      group);
  auto& family = prometheus::BuildGauge()
                     .Name("moeserve_expert_balancedness")
                     .Help("Mean over max of the tokens each rank's experts processed (last step)")
                     .Register(*registry);
  for (int layer = 0; layer < num_moe_layers; ++layer) {
    balancedness_gauges_.push_back(
        &family.Add({{"group", group}, {"layer", std::to_string(layer)}}));
  }
}

void ParallelMetrics::SetHealthy(bool healthy) {
  if (healthy_ != nullptr) healthy_->Set(healthy ? 1 : 0);
}

void ParallelMetrics::AddStepGraph(bool captured) {
  absl::MutexLock lock(&mutex_);
  ++(captured ? totals_.step_graph_captures : totals_.step_graph_replays);
  prometheus::Counter* counter = captured ? step_graph_captures_ : step_graph_replays_;
  if (counter != nullptr) counter->Increment();
}

void ParallelMetrics::AddExchangeOverflow() {
  absl::MutexLock lock(&mutex_);
  ++totals_.exchange_overflow_steps;
  if (exchange_overflows_ != nullptr) exchange_overflows_->Increment();
}

void ParallelMetrics::AddDispatch(int64_t bytes, double seconds) {
  absl::MutexLock lock(&mutex_);
  totals_.dispatch_bytes += bytes;
  totals_.dispatch_seconds += seconds;
  if (dispatch_bytes_ != nullptr) {
    dispatch_bytes_->Increment(static_cast<double>(bytes));
    dispatch_seconds_->Increment(seconds);
    overlap_ratio_->Set(totals_.overlap_ratio());
  }
}

void ParallelMetrics::AddCombine(int64_t bytes, double seconds) {
  absl::MutexLock lock(&mutex_);
  totals_.combine_bytes += bytes;
  totals_.combine_seconds += seconds;
  if (combine_bytes_ != nullptr) {
    combine_bytes_->Increment(static_cast<double>(bytes));
    combine_seconds_->Increment(seconds);
    overlap_ratio_->Set(totals_.overlap_ratio());
  }
}

void ParallelMetrics::AddExposedWait(double seconds) {
  absl::MutexLock lock(&mutex_);
  totals_.exposed_seconds += seconds;
  if (exposed_seconds_ != nullptr) {
    exposed_seconds_->Increment(seconds);
    overlap_ratio_->Set(totals_.overlap_ratio());
  }
}

void ParallelMetrics::SetBalancedness(int moe_layer, double mean_over_max) {
  absl::MutexLock lock(&mutex_);
  balancedness_[moe_layer] = mean_over_max;
  if (!balancedness_gauges_.empty()) balancedness_gauges_[moe_layer]->Set(mean_over_max);
}

ParallelMetrics::Totals ParallelMetrics::totals() const {
  absl::MutexLock lock(&mutex_);
  return totals_;
}

std::vector<double> ParallelMetrics::balancedness() const {
  absl::MutexLock lock(&mutex_);
  return balancedness_;
}

}  // namespace moeserve::engine::parallel
