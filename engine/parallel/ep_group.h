// ExpertParallelGroup: the ranks of one expert-parallel group that run in this process, and
// what they share — the communicators (injected: in-process for ranks that are threads, or a
// group spanning processes), one communication thread per rank for two-batch overlap, the
// group's metrics, expert-load counters, optional trace, its placement, and its health.
//
// Per step, every rank calls Agree() with its local work; one small all-reduce decides for all
// of them whether to run, whether to split into two micro-batches, whether to stop, and at
// which step a new placement commits (all ranks switch at the same step boundary, in every
// process). A new placement's slots are prepared in the background by each rank's ExpertStager
// (host copies by default; a GPU backend registers its own) while the ranks keep serving.
//
// Thread-safe: rank threads call Agree()/placement(rank)/resources(rank) for their own rank;
// UpdatePlacement(), Fail() and the accessors of shared state may be called from any thread.
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "engine/comm/communicator_group.h"
#include "engine/comm/peer_waker.h"
#include "engine/model/model.h"
#include "engine/parallel/communication_thread.h"
#include "engine/parallel/ep_forward.h"
#include "engine/parallel/parallel_metrics.h"
#include "engine/placement/expert_load.h"
#include "engine/placement/expert_placement.h"
#include "engine/placement/expert_stager.h"
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
  // How long the default in-process communicators wait for the slowest rank.
  std::chrono::milliseconds collective_timeout = std::chrono::seconds(120);
  // Stage each rank's own host copies of its slots' weights (the CPU backend computes from
  // them). A GPU backend registers its own stager instead (SetExpertStager), so it turns this
  // off; models whose routed experts exist on GPUs only (ModelConfig::routed_experts_on_device)
  // need it off.
  bool stage_host_expert_weights = true;
};

// What a group is built from that the caller may provide.
struct GroupParts {
  // The communicators of the local ranks, with two channels (compute, overlap). Null: an
  // in-process group of options.size ranks, every rank local.
  std::unique_ptr<comm::CommunicatorGroup> communicators;
  // Where staged expert slots are read from. Null: the model's host weights.
  std::unique_ptr<ExpertWeightSource> weight_source;
  // Ranks in other processes: how to wake them when this one gets work. Null: all ranks local.
  std::unique_ptr<comm::PeerWaker> waker;
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
  // `registry` and `trace` may be null. `placement` must fit the model and divide over
  // `options.size` ranks.
  static absl::StatusOr<std::unique_ptr<ExpertParallelGroup>> Create(
      const Model& model, GroupOptions options, ExpertPlacement placement,
      prometheus::Registry* registry, TraceRecorder* trace, int trace_pid_offset = 0,
      GroupParts parts = {});
  ~ExpertParallelGroup();

  const std::string& name() const { return options_.name; }
  int size() const { return options_.size; }
  const std::vector<int>& local_ranks() const { return local_ranks_; }
  const GroupOptions& options() const { return options_; }
  const ExpertParallelForward& forward() const { return forward_; }
  RankResources& resources(int rank) { return *resources_[rank]; }
  ParallelMetrics& metrics() { return metrics_; }
  ExpertLoadRecorder& load() { return load_; }
  const ExpertLoadRecorder& load() const { return load_; }
  // What placements of this group must fit.
  PlacementShape placement_shape() const;

  // A rank's own stager, replacing the host one (before the ranks start stepping). The stager
  // must already hold the group's current placement.
  void SetExpertStager(int rank, ExpertStager* stager);

  // The placement rank `rank` computes with (switches only inside Agree()).
  const ExpertPlacement& placement(int rank) const { return *rank_placement_[rank]; }
  // The committed placement (any thread): committed once every local rank switched to it.
  std::shared_ptr<const ExpertPlacement> committed_placement() const;

  // Called by every rank, together, once per step.
  absl::StatusOr<StepAgreement> Agree(int rank, int64_t local_tokens, bool stop_requested);
  // Agreements rank `rank` took part in (the group's step count, the same on every rank), and
  // the one at which its current placement committed (-1: the initial placement). Any thread.
  int64_t steps(int rank) const { return progress_[rank].steps.load(); }
  int64_t placement_commit_step(int rank) const { return progress_[rank].commit_step.load(); }

  // Applies `placement` (validated to fit placement_shape(); its version must exceed the
  // committed one): a background thread stages the slots whose expert changed into each local
  // rank's stager while the ranks keep serving, then every rank commits it at the same step
  // boundary. Returns once committed. FAILED_PRECONDITION for a stale version or while another
  // update is in progress; INVALID_ARGUMENT for a wrong shape; the staging error; UNAVAILABLE
  // if the group fails meanwhile; DEADLINE_EXCEEDED after `timeout`, in which case the update
  // is withdrawn and never commits (the call answers OK if it committed before it could be).
  absl::Status UpdatePlacement(ExpertPlacement placement, std::chrono::milliseconds timeout);

  // Wakes ranks idling in WaitForWork (new work or shutdown), those of other processes too.
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
                      prometheus::Registry* registry, GroupParts parts);

  // A placement being applied. Guarded by placement_mutex_ except `placement` (immutable).
  struct PendingPlacement {
    std::shared_ptr<const ExpertPlacement> placement;
    bool staged = false;      // every local stager holds it
    bool cancelled = false;   // withdrawn: ranks no longer vote for it
    bool discarded = false;   // the stagers dropped it
    int votes = 0;            // local ranks inside an Agree that voted for it
    int committed_ranks = 0;  // local ranks that switched to it
  };
  // Stages `pending` into every local stager (the staging thread).
  void Stage(std::shared_ptr<PendingPlacement> pending);
  // Drops `pending` from the stagers once (the caller holds no lock).
  void DiscardStaged(PendingPlacement& pending);
  ExpertStager* stager(int rank) const;

  GroupOptions options_;
  ExpertParallelForward forward_;
  std::unique_ptr<comm::CommunicatorGroup> communicators_;
  std::vector<int> local_ranks_;
  ParallelMetrics metrics_;
  ExpertLoadRecorder load_;
  std::unique_ptr<ExpertWeightSource> weight_source_;
  std::vector<std::unique_ptr<CommunicationThread>> communication_threads_;
  std::vector<std::unique_ptr<RankResources>> resources_;               // [rank]; local ranks only
  std::vector<std::unique_ptr<HostExpertStager>> host_stagers_;         // [rank]; when staging
  std::vector<ExpertStager*> stagers_;                                  // [rank]; may be null
  std::vector<std::shared_ptr<const ExpertPlacement>> rank_placement_;  // [rank]; each rank's own
  struct Progress {
    std::atomic<int64_t> steps{0};
    std::atomic<int64_t> commit_step{-1};
  };
  std::unique_ptr<Progress[]> progress_;  // [rank]

  // The fields of the pending placement (PendingPlacement) are guarded by it too.
  mutable absl::Mutex placement_mutex_;
  absl::CondVar placement_changed_;
  std::shared_ptr<const ExpertPlacement> committed_ ABSL_GUARDED_BY(placement_mutex_);
  std::shared_ptr<PendingPlacement> pending_ ABSL_GUARDED_BY(placement_mutex_);
  absl::Status staging_error_ ABSL_GUARDED_BY(placement_mutex_);
  std::thread staging_thread_;  // joined before the next one starts (UpdatePlacement callers)
  absl::Mutex update_mutex_;    // one UpdatePlacement at a time starts or joins staging

  void NotifyLocalRanks();

  absl::Mutex work_mutex_;
  absl::CondVar work_available_;
  uint64_t work_generation_ ABSL_GUARDED_BY(work_mutex_) = 0;

  mutable absl::Mutex health_mutex_;
  absl::Status failure_ ABSL_GUARDED_BY(health_mutex_);  // OK while healthy
  std::atomic<bool> failed_{false};
  std::function<void(const absl::Status&)> failure_listener_;

  // Last: destroyed first, as its receive thread wakes this group's ranks.
  std::unique_ptr<comm::PeerWaker> waker_;
};

}  // namespace moeserve::engine::parallel
