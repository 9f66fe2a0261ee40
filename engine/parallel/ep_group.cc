#include "engine/parallel/ep_group.h"

#include "absl/strings/str_cat.h"
#include "spdlog/spdlog.h"

namespace moeserve::engine::parallel {

absl::StatusOr<std::unique_ptr<ExpertParallelGroup>> ExpertParallelGroup::Create(
    const Model& model, GroupOptions options, ExpertPlacement placement,
    prometheus::Registry* registry, TraceRecorder* trace, int trace_pid_offset) {
  if (options.size < 1) return absl::InvalidArgumentError("an EP group needs at least 1 rank");
  if (auto status = placement.CheckRanks(options.size); !status.ok()) return status;
  if (options.stage_host_expert_weights && model.config().routed_experts_on_device) {
    // Host staging copies experts from the model's weights, which such a model does not have.
    return absl::InvalidArgumentError(absl::StrCat(
        "`", model.config().name, "` keeps its routed experts on GPUs only; use --device cuda"));
  }
  auto group = std::unique_ptr<ExpertParallelGroup>(
      new ExpertParallelGroup(model, std::move(options), std::move(placement), registry));
  // Each rank starts with its own copies of its slots' weights.
  if (auto s = group->StageAll(*group->committed_, group->rank_weights_); !s.ok()) return s;
  for (int rank = 0; rank < group->size(); ++rank) {
    group->resources(rank).expert_weights = group->rank_weights_[rank].get();
  }
  for (int rank = 0; rank < group->size(); ++rank) {
    RankResources& r = group->resources(rank);
    r.trace = trace;
    r.trace_pid = trace_pid_offset + rank;
    if (trace != nullptr) {
      trace->NameProcess(r.trace_pid, absl::StrCat(group->name(), " rank ", rank));
      trace->NameThread(r.trace_pid, kTraceComputeLane, "compute");
      trace->NameThread(r.trace_pid, kTraceCommunicationLane, "communication");
      trace->NameThread(r.trace_pid, kTraceStepLane, "step");
    }
  }
  return group;
}

ExpertParallelGroup::ExpertParallelGroup(const Model& model, GroupOptions options,
                                         ExpertPlacement placement, prometheus::Registry* registry)
    : options_(std::move(options)),
      forward_(model),
      communicators_(options_.size, /*num_channels=*/2, options_.collective_timeout),
      metrics_(options_.name, model.config().num_moe_layers(), registry),
      load_(model.config().num_moe_layers(), model.config().n_routed_experts, options_.name,
            options_.expert_load_metrics ? registry : nullptr) {
  committed_ = std::make_shared<const ExpertPlacement>(std::move(placement));
  rank_placement_.assign(options_.size, committed_);
  rank_weights_.assign(options_.size, nullptr);
  weight_source_ = std::make_unique<ModelExpertWeightSource>(model);
  for (int rank = 0; rank < options_.size; ++rank) {
    auto resources = std::make_unique<RankResources>();
    resources->compute = &communicators_.communicator(rank, 0);
    if (options_.two_batch_overlap) {
      communication_threads_.push_back(std::make_unique<CommunicationThread>());
      resources->overlap = &communicators_.communicator(rank, 1);
      resources->communication_thread = communication_threads_.back().get();
    }
    resources->load = &load_;
    resources->metrics = &metrics_;
    resources_.push_back(std::move(resources));
  }
}

ExpertParallelGroup::~ExpertParallelGroup() {
  if (staging_thread_.joinable()) staging_thread_.join();
}

absl::Status ExpertParallelGroup::StageAll(
    const ExpertPlacement& placement,
    std::vector<std::shared_ptr<const RankExpertWeights>>& out) const {
  if (!options_.stage_host_expert_weights) {
    out.assign(size(), nullptr);
    return absl::OkStatus();
  }
  const int slots_per_rank = placement.num_physical() / size();
  std::vector<std::shared_ptr<const RankExpertWeights>> staged(size());
  for (int rank = 0; rank < size(); ++rank) {
    // The rank's current weights lend the slots that keep their expert. A rank may still be
    // switching to the previous placement, so take a reference under the lock.
    std::shared_ptr<const RankExpertWeights> previous;
    {
      std::lock_guard lock(placement_mutex_);
      previous = rank_weights_[rank];
    }
    auto weights = RankExpertWeights::Stage(*weight_source_, placement, rank * slots_per_rank,
                                            slots_per_rank, previous.get());
    if (!weights.ok()) return weights.status();
    staged[rank] = std::move(*weights);
  }
  out = std::move(staged);
  return absl::OkStatus();
}

std::shared_ptr<const ExpertPlacement> ExpertParallelGroup::committed_placement() const {
  std::lock_guard lock(placement_mutex_);
  return committed_;
}

absl::StatusOr<StepAgreement> ExpertParallelGroup::Agree(int rank, int64_t local_tokens,
                                                         bool stop_requested) {
  // A rank is ready for the pending placement once it has staged it. On the CPU all ranks
  // share the model's expert weights in host memory, so staging is immediate; a GPU rank
  // copies the new slots' weights first and reports readiness only then.
  std::shared_ptr<PendingPlacement> pending;
  {
    std::lock_guard lock(placement_mutex_);
    pending = pending_;
  }
  const int64_t current = rank_placement_[rank]->version();
  const int64_t staged =
      pending != nullptr && pending->staged.load() ? pending->placement->version() : current;
  // [has work, tokens, stop, staged version (min), current version (min), -current (min = max)]
  int64_t values[6] = {local_tokens > 0, local_tokens, stop_requested ? 1 : 0,
                       staged,           current,      -current};
  comm::Communicator& comm = *resources_[rank]->compute;
  int64_t maxima[3] = {values[0], values[1], values[2]};
  if (auto s = comm.AllReduce(maxima, 3, comm::ReduceOp::kMax); !s.ok()) return s;
  int64_t minima[3] = {values[3], values[4], values[5]};
  if (auto s = comm.AllReduce(minima, 3, comm::ReduceOp::kMin); !s.ok()) return s;
  if (minima[1] != -minima[2]) {
    return absl::InternalError(absl::StrCat("group ", name(),
                                            ": ranks disagree on the placement version (",
                                            minima[1], " vs ", -minima[2], ")"));
  }
  StepAgreement agreement;
  agreement.any_work = maxima[0] > 0;
  agreement.max_tokens = maxima[1];
  agreement.stop = maxima[2] > 0;
  agreement.split =
      options_.two_batch_overlap && agreement.max_tokens >= options_.overlap_min_tokens;
  // Commit: every rank has staged the pending version, so all switch at this step boundary.
  if (pending != nullptr && minima[0] == pending->placement->version() &&
      pending->placement->version() > current) {
    rank_placement_[rank] = pending->placement;
    {
      std::lock_guard lock(placement_mutex_);
      rank_weights_[rank] = pending->weights[rank];
    }
    resources_[rank]->expert_weights = rank_weights_[rank].get();
    if (rank == 0) {
      std::lock_guard lock(placement_mutex_);
      // Rank 0 publishes the commit; the other ranks switch at the same agreement.
      committed_ = pending->placement;
      if (pending_ == pending) pending_.reset();
      placement_committed_.notify_all();
    }
  }
  agreement.placement_version = rank_placement_[rank]->version();
  return agreement;
}

absl::Status ExpertParallelGroup::UpdatePlacement(ExpertPlacement placement,
                                                  std::chrono::milliseconds timeout) {
  if (auto s = placement.CheckRanks(size()); !s.ok()) return s;
  std::unique_lock lock(placement_mutex_);
  const ExpertPlacement& current = *committed_;
  if (placement.num_layers() != current.num_layers() ||
      placement.num_logical() != current.num_logical() ||
      placement.num_physical() != current.num_physical()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "placement shape ", placement.num_layers(), " layers x ", placement.num_physical(),
        " slots does not match the group's ", current.num_layers(), " x ", current.num_physical()));
  }
  const int64_t floor =
      std::max(current.version(), pending_ ? pending_->placement->version() : int64_t{0});
  if (placement.version() <= floor) {
    return absl::FailedPreconditionError(absl::StrCat(
        "placement version ", placement.version(), " is stale: the group is at version ", floor));
  }
  if (pending_ != nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat("placement version ", pending_->placement->version(),
                     " is still being applied; retry after it commits"));
  }
  auto staged = std::make_shared<PendingPlacement>();
  staged->placement = std::make_shared<const ExpertPlacement>(std::move(placement));
  staging_error_ = absl::OkStatus();
  pending_ = staged;
  const int64_t version = staged->placement->version();
  if (staging_thread_.joinable()) staging_thread_.join();
  // Copy the changed slots' weights while the ranks keep serving with the old placement.
  staging_thread_ = std::thread([this, staged] {
    std::vector<std::shared_ptr<const RankExpertWeights>> weights;
    absl::Status status = StageAll(*staged->placement, weights);
    std::lock_guard lock(placement_mutex_);
    if (!status.ok()) {
      if (pending_ == staged) pending_.reset();  // nothing changes
      staging_error_ = status;
      placement_committed_.notify_all();
      return;
    }
    staged->weights = std::move(weights);
    staged->staged = true;
  });
  lock.unlock();
  NotifyWork();  // idle ranks step so the commit happens without traffic
  lock.lock();
  if (!placement_committed_.wait_for(lock, timeout, [&] {
        return committed_->version() >= version || !staging_error_.ok();
      })) {
    return absl::DeadlineExceededError(
        absl::StrCat("placement version ", version, " was not committed within the timeout"));
  }
  if (committed_->version() < version) return staging_error_;
  return absl::OkStatus();
}

absl::Status ExpertParallelGroup::Fail(int rank, const absl::Status& reason) {
  absl::Status failure;
  {
    std::lock_guard lock(health_mutex_);
    if (!failure_.ok()) return failure_;
    failure_ = absl::UnavailableError(absl::StrCat(
        "expert-parallel group `", name(), "` failed: rank ", rank, ": ", reason.message()));
    failed_ = true;
    failure = failure_;
  }
  communicators_.Abort();
  spdlog::error("{}", std::string(failure.message()));
  metrics_.SetHealthy(false);
  if (failure_listener_) failure_listener_(failure);
  NotifyWork();
  return failure;
}

absl::Status ExpertParallelGroup::health() const {
  std::lock_guard lock(health_mutex_);
  return failure_;
}

void ExpertParallelGroup::NotifyWork() {
  {
    std::lock_guard lock(work_mutex_);
    ++work_generation_;
  }
  work_available_.notify_all();
}

void ExpertParallelGroup::WaitForWork(std::chrono::milliseconds timeout) {
  std::unique_lock lock(work_mutex_);
  const uint64_t seen = work_generation_;
  work_available_.wait_for(lock, timeout, [&] { return work_generation_ != seen; });
}

}  // namespace moeserve::engine::parallel
