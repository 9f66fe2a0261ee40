// ExpertLoadRecorder: counts, per MoE layer and logical expert, the tokens the group's expert
// slots processed — in memory (for the admin API and tests) and, when a registry is given, as
// the Prometheus counter moeserve_expert_tokens_total{group, layer, expert} that the EPLB
// controller aggregates. A series appears at its expert's first token, so a rank process
// exports only the experts its slots hold (at most MoE layers × logical experts per group).
//
// Thread-safe: every rank of the group records concurrently.
#pragma once

#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/registry.h"

namespace moeserve::engine {

class ExpertLoadRecorder {
 public:
  // `registry` may be null (in-memory counts only).
  ExpertLoadRecorder(int num_moe_layers, int num_logical, const std::string& group,
                     prometheus::Registry* registry);

  void Record(int moe_layer, int logical_expert, int64_t tokens);
  // Exports the expert's series now, at zero if it has no tokens yet: the group's ranks expose
  // the experts their initial slots hold, so that together they export every expert's series
  // (the EPLB controller refuses partial data).
  void Expose(int moe_layer, int logical_expert);
  // Tokens per [layer][expert] since start.
  std::vector<std::vector<int64_t>> Snapshot() const;
  int num_layers() const { return num_layers_; }
  int num_logical() const { return num_logical_; }

 private:
  prometheus::Counter& Series(size_t index, int moe_layer, int logical_expert);

  int num_layers_;
  int num_logical_;
  std::unique_ptr<std::atomic<int64_t>[]> counts_;
  const std::string group_;
  prometheus::Family<prometheus::Counter>* family_ = nullptr;  // null without a registry
  // [layer * num_logical + expert]: its series, once it has one. Set under add_mutex_ (the
  // family's Add is not meant for the hot path); read without it.
  std::unique_ptr<std::atomic<prometheus::Counter*>[]> counters_;
  absl::Mutex add_mutex_;
};

}  // namespace moeserve::engine
