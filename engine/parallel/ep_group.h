// ExpertParallelGroup: N ranks that step together — the in-process communicator group (two
// channels: compute and communication), one communication thread per rank for two-batch
// overlap, the group's metrics, expert-load counters, optional trace, and its placement.
//
// Per step, every rank calls Agree() with its local work; the one small all-reduce decides for
// all of them whether to run, whether to split into two micro-batches, whether to stop, and at
// which step a new placement is committed (all ranks switch at the same step boundary).
// Thread-safe: rank threads call Agree()/placement(rank) for their own rank; UpdatePlacement()
// may be called from any thread.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/comm/in_process_communicator.h"
#include "engine/model/model.h"
#include "engine/parallel/communication_thread.h"
#include "engine/parallel/ep_forward.h"
#include "engine/parallel/parallel_metrics.h"
#include "engine/placement/expert_load.h"
#include "engine/placement/expert_placement.h"
#include "engine/placement/expert_weights.h"
#include "engine/trace/trace_recorder.h"
#include "prometheus/registry.h"

namespace moeserve::engine::parallel {

struct GroupOptions {
  std::string name = "mixed";
  int size = 1;
  bool two_batch_overlap = false;
  // Below this many tokens on the busiest rank, a step is not split (small steps run faster
  // whole).
  int overlap_min_tokens = 32;
  bool expert_load_metrics = true;  // per (layer, expert) Prometheus series
  std::chrono::milliseconds collective_timeout = std::chrono::seconds(120);
  // Stage each rank's own host copies of its slots' weights on placement updates (the CPU
  // backend computes from them). A GPU backend uploads changed slots itself, so it turns this
  // off and a new placement commits as soon as the ranks agree. Models whose routed experts
  // exist on GPUs only (ModelConfig::routed_experts_on_device) need it off.
  bool stage_host_expert_weights = true;
};

struct StepAgreement {
  bool any_work = false;
  bool split = false;
  bool stop = false;
  int64_t max_tokens = 0;
  int64_t placement_version = 0;
};

class ExpertParallelGroup {
 public:
  // `registry` and `trace` may be null. `placement` must divide over `options.size` ranks.
  static absl::StatusOr<std::unique_ptr<ExpertParallelGroup>> Create(
      const Model& model, GroupOptions options, ExpertPlacement placement,
      prometheus::Registry* registry, TraceRecorder* trace, int trace_pid_offset = 0);

  const std::string& name() const { return options_.name; }
  int size() const { return options_.size; }
  const GroupOptions& options() const { return options_; }
  const ExpertParallelForward& forward() const { return forward_; }
  RankResources& resources(int rank) { return *resources_[rank]; }
  ParallelMetrics& metrics() { return metrics_; }
  ExpertLoadRecorder& load() { return load_; }

  // The placement rank `rank` computes with (switches only inside Agree()).
  const ExpertPlacement& placement(int rank) const { return *rank_placement_[rank]; }
  // The committed placement (any thread).
  std::shared_ptr<const ExpertPlacement> committed_placement() const;

  // Called by every rank, together, once per step.
  absl::StatusOr<StepAgreement> Agree(int rank, int64_t local_tokens, bool stop_requested);

  // Stages `placement` (its version must exceed the committed one): a background thread copies
  // the slots whose expert changed into each rank's weights while the ranks keep serving; then
  // every rank commits it at the same step boundary. Returns once committed;
  // FAILED_PRECONDITION for a stale version or while another update is in progress,
  // INVALID_ARGUMENT for a wrong shape, DEADLINE_EXCEEDED after `timeout` (the update may still
  // commit later).
  absl::Status UpdatePlacement(ExpertPlacement placement, std::chrono::milliseconds timeout);

  // Wakes ranks idling in WaitForWork (new work or shutdown).
  void NotifyWork();
  void WaitForWork(std::chrono::milliseconds timeout);

  // Fails the group: records the first failure's reason (later ones are consequences: peers'
  // collectives fail once one rank stops), aborts every pending and future collective, logs the
  // reason once, sets moeserve_group_healthy to 0 and calls the failure listener. Returns the
  // group's failure: UNAVAILABLE naming the group, the rank that failed first and why. Any thread.
  absl::Status Fail(int rank, const absl::Status& reason);
  // OK while the group serves; its failure (as Fail returns it) once failed. Any thread.
  absl::Status health() const;
  bool healthy() const { return !failed_.load(); }
  // Called once, from the thread that fails the group, right after the failure is recorded.
  // Set before the ranks start.
  void SetFailureListener(std::function<void(const absl::Status&)> listener) {
    failure_listener_ = std::move(listener);
  }

 private:
  ExpertParallelGroup(const Model& model, GroupOptions options, ExpertPlacement placement,
                      prometheus::Registry* registry);

 public:
  ~ExpertParallelGroup();

 private:
  absl::Status StageAll(const ExpertPlacement& placement,
                        std::vector<std::shared_ptr<const RankExpertWeights>>& out) const;

  GroupOptions options_;
  ExpertParallelForward forward_;
  comm::InProcessGroup communicators_;
  ParallelMetrics metrics_;
  ExpertLoadRecorder load_;
  std::vector<std::unique_ptr<CommunicationThread>> communication_threads_;
  std::vector<std::unique_ptr<RankResources>> resources_;

  mutable std::mutex placement_mutex_;
  std::condition_variable placement_committed_;
  std::shared_ptr<const ExpertPlacement> committed_;  // guarded by placement_mutex_
  // A placement being applied, with each rank's weights once the staging thread has them. A
  // rank keeps its own reference for the whole step, so an update that starts right after the
  // commit (the caller returns once rank 0 committed) cannot change what a rank still
  // switching reads.
  struct PendingPlacement {
    std::shared_ptr<const ExpertPlacement> placement;
    std::vector<std::shared_ptr<const RankExpertWeights>> weights;  // guarded by placement_mutex_
    std::atomic<bool> staged{false};                                // weights are complete
  };
  std::shared_ptr<PendingPlacement> pending_;  // guarded by placement_mutex_
  absl::Status staging_error_;                 // guarded by placement_mutex_
  std::thread staging_thread_;
  std::vector<std::shared_ptr<const ExpertPlacement>> rank_placement_;  // each rank's own
  std::vector<std::shared_ptr<const RankExpertWeights>> rank_weights_;  // each rank's own
  std::unique_ptr<ExpertWeightSource> weight_source_;

  std::mutex work_mutex_;
  std::condition_variable work_available_;
  uint64_t work_generation_ = 0;

  mutable std::mutex health_mutex_;
  absl::Status failure_;  // guarded by health_mutex_; OK while healthy
  std::atomic<bool> failed_{false};
  std::function<void(const absl::Status&)> failure_listener_;
};

}  // namespace moeserve::engine::parallel
