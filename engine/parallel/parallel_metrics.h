// ParallelMetrics: what an expert-parallel group's communication costs and how much of it the
// two-micro-batch overlap hides. Exported (when a registry is given) as
//   moeserve_dispatch_bytes_total / moeserve_combine_bytes_total{group}
//   moeserve_dispatch_seconds_total / moeserve_combine_seconds_total{group}
//   moeserve_communication_exposed_seconds_total{group}  (compute waiting on communication)
//   moeserve_overlap_ratio{group}      (share of communication time hidden behind compute)
//   moeserve_expert_balancedness{group, layer}  (mean / max tokens per rank, last step)
//   moeserve_group_healthy{group}      (1 while the group serves, 0 once it failed)
//   moeserve_gpu_step_graph_captures_total / moeserve_gpu_step_graph_replays_total{group}
//                                      (GPU steps captured as CUDA graphs, and run from one)
//   moeserve_gpu_exchange_overflow_steps_total{group}
//                                      (steps whose device-planned exchange overflowed its
//                                       capacity and were redone with the host's plan)
// and kept in memory for benchmarks and tests.
//
// Thread-safe: every rank of the group records concurrently.
#pragma once

#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "prometheus/counter.h"
#include "prometheus/gauge.h"
#include "prometheus/registry.h"

namespace moeserve::engine::parallel {

class ParallelMetrics {
 public:
  struct Totals {
    int64_t dispatch_bytes = 0;
    int64_t combine_bytes = 0;
    double dispatch_seconds = 0;
    double combine_seconds = 0;
    double exposed_seconds = 0;  // compute thread blocked waiting for communication
    int64_t step_graph_captures = 0;
    int64_t step_graph_replays = 0;
    int64_t exchange_overflow_steps = 0;
    double communication_seconds() const { return dispatch_seconds + combine_seconds; }
    // 1 when all communication ran while compute went on; 0 when compute always waited.
    double overlap_ratio() const {
      const double total = communication_seconds();
      return total > 0 ? std::max(0.0, 1.0 - exposed_seconds / total) : 0.0;
    }
  };

  ParallelMetrics(const std::string& group, int num_moe_layers, prometheus::Registry* registry);

  void AddDispatch(int64_t bytes, double seconds);
  void AddCombine(int64_t bytes, double seconds);
  void AddExposedWait(double seconds);
  void SetBalancedness(int moe_layer, double mean_over_max);
  void SetHealthy(bool healthy);
  // A GPU step launched from a CUDA graph (engine/backend/cuda/step_graphs.h), `captured` for
  // it first.
  void AddStepGraph(bool captured);
  // A step redone because its device-planned exchange overflowed (per rank).
  void AddExchangeOverflow();
  Totals totals() const;
  std::vector<double> balancedness() const;

 private:
  mutable absl::Mutex mutex_;
  Totals totals_ ABSL_GUARDED_BY(mutex_);
  std::vector<double> balancedness_ ABSL_GUARDED_BY(mutex_);
  prometheus::Counter* dispatch_bytes_ = nullptr;
  prometheus::Counter* combine_bytes_ = nullptr;
  prometheus::Counter* dispatch_seconds_ = nullptr;
  prometheus::Counter* combine_seconds_ = nullptr;
  prometheus::Counter* exposed_seconds_ = nullptr;
  prometheus::Gauge* overlap_ratio_ = nullptr;
  prometheus::Gauge* healthy_ = nullptr;
  prometheus::Counter* step_graph_captures_ = nullptr;
  prometheus::Counter* step_graph_replays_ = nullptr;
  prometheus::Counter* exchange_overflows_ = nullptr;
  std::vector<prometheus::Gauge*> balancedness_gauges_;
};

}  // namespace moeserve::engine::parallel
