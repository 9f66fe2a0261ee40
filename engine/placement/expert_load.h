// ExpertLoadRecorder: counts, per MoE layer and logical expert, the tokens the group's expert
// slots processed — in memory (for the admin API and tests) and, when a registry is given, as
// the Prometheus counter moeserve_expert_tokens_total{group, layer, expert} that the EPLB
// controller aggregates. Series: MoE layers × logical experts per group.
//
// Thread-safe: every rank of the group records concurrently.
#pragma once

#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "prometheus/counter.h"
#include "prometheus/registry.h"

namespace moeserve::engine {

class ExpertLoadRecorder {
 public:
  // `registry` may be null (in-memory counts only).
  ExpertLoadRecorder(int num_moe_layers, int num_logical, const std::string& group,
                     prometheus::Registry* registry);

  void Record(int moe_layer, int logical_expert, int64_t tokens);
  // Tokens per [layer][expert] since start.
  std::vector<std::vector<int64_t>> Snapshot() const;
  int num_layers() const { return num_layers_; }
  int num_logical() const { return num_logical_; }

 private:
  int num_layers_;
  int num_logical_;
  std::unique_ptr<std::atomic<int64_t>[]> counts_;
  std::vector<prometheus::Counter*> counters_;  // empty without a registry
};

}  // namespace moeserve::engine
