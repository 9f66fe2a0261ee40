#include "engine/parallel/ep_group.h"

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "engine/base/status_macros.h"
#include "engine/comm/in_process_communicator.h"
#include "spdlog/spdlog.h"

namespace moeserve::engine::parallel {

absl::StatusOr<std::unique_ptr<ExpertParallelGroup>> ExpertParallelGroup::Create(
    const Model& model, GroupOptions options, ExpertPlacement placement,
    prometheus::Registry* registry, TraceRecorder* trace, int trace_pid_offset, GroupParts parts) {
  if (options.size < 1) return absl::InvalidArgumentError("an EP group needs at least 1 rank");
  RETURN_IF_ERROR(placement.CheckRanks(options.size));
  if (options.stage_host_expert_weights && model.config().routed_experts_on_device) {
    // Host staging copies experts from the model's weights, which such a model does not have.
    return absl::InvalidArgumentError(absl::StrCat(
        "`", model.config().name, "` keeps its routed experts on GPUs only; use --device cuda"));
  }
  if (parts.communicators != nullptr &&
      (parts.communicators->size() != options.size || parts.communicators->num_channels() < 2)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "group ", options.name, ": the communicators are for ", parts.communicators->size(),
        " ranks and ", parts.communicators->num_channels(), " channels; need ", options.size,
        " ranks and 2 channels"));
  }
  auto group = std::unique_ptr<ExpertParallelGroup>(new ExpertParallelGroup(
      model, std::move(options), std::move(placement), registry, std::move(parts)));
  // Each local rank starts with its own copies of its slots' weights.
  const std::shared_ptr<const ExpertPlacement> committed = group->committed_placement();
  const ExpertPlacement& initial = *committed;
  for (int rank : group->local_ranks_) {
    HostExpertStager* host = group->host_stagers_[rank].get();
    if (host == nullptr) continue;
    RETURN_IF_ERROR(host->Stage(initial));
    host->Commit(initial);
    group->resources(rank).expert_weights = host->current();
  }
  for (int rank : group->local_ranks_) {
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
                                         ExpertPlacement placement, prometheus::Registry* registry,
                                         GroupParts parts)
    : options_(std::move(options)),
      forward_(model),
      communicators_(std::move(parts.communicators)),
      metrics_(options_.name, model.config().num_moe_layers(), registry),
      load_(model.config().num_moe_layers(), model.config().n_routed_experts, options_.name,
            options_.expert_load_metrics ? registry : nullptr),
      weight_source_(std::move(parts.weight_source)) {
  if (communicators_ == nullptr) {
    communicators_ = std::make_unique<comm::InProcessGroup>(options_.size, /*num_channels=*/2,
                                                            options_.collective_timeout);
  }
  if (weight_source_ == nullptr) weight_source_ = std::make_unique<ModelExpertWeightSource>(model);
  local_ranks_ = communicators_->local_ranks();
  committed_ = std::make_shared<const ExpertPlacement>(std::move(placement));
  rank_placement_.assign(options_.size, committed_);
  resources_.resize(options_.size);
  host_stagers_.resize(options_.size);
  stagers_.assign(options_.size, nullptr);
  communication_threads_.resize(options_.size);
  const int slots_per_rank = committed_->num_physical() / options_.size;
  for (int rank : local_ranks_) {
    auto resources = std::make_unique<RankResources>();
    resources->compute = &communicators_->communicator(rank, 0);
    if (options_.two_batch_overlap) {
      communication_threads_[rank] = std::make_unique<CommunicationThread>();
      resources->overlap = &communicators_->communicator(rank, 1);
      resources->communication_thread = communication_threads_[rank].get();
    }
    resources->load = &load_;
    resources->metrics = &metrics_;
    resources_[rank] = std::move(resources);
    if (options_.stage_host_expert_weights) {
      host_stagers_[rank] = std::make_unique<HostExpertStager>(
          *weight_source_, rank * slots_per_rank, slots_per_rank);
      stagers_[rank] = host_stagers_[rank].get();
    }
  }
}

ExpertParallelGroup::~ExpertParallelGroup() {
  if (staging_thread_.joinable()) staging_thread_.join();
}

PlacementShape ExpertParallelGroup::placement_shape() const {
  absl::MutexLock lock(&placement_mutex_);
  return {committed_->num_layers(), committed_->num_logical(), committed_->num_physical(),
          options_.size};
}

void ExpertParallelGroup::SetExpertStager(int rank, ExpertStager* stager) {
  absl::MutexLock lock(&placement_mutex_);
  stagers_[rank] = stager;
  host_stagers_[rank].reset();
  resources_[rank]->expert_weights = nullptr;
}

ExpertStager* ExpertParallelGroup::stager(int rank) const {
  absl::MutexLock lock(&placement_mutex_);
  return stagers_[rank];
}

std::shared_ptr<const ExpertPlacement> ExpertParallelGroup::committed_placement() const {
  absl::MutexLock lock(&placement_mutex_);
  return committed_;
}

absl::StatusOr<StepAgreement> ExpertParallelGroup::Agree(int rank, int64_t local_tokens,
                                                         bool stop_requested) {
  // A rank votes for the pending placement once every local stager holds it (and it was not
  // withdrawn); the placement commits at the step where every rank of the group votes.
  std::shared_ptr<PendingPlacement> pending;
  bool vote = false;
  {
    absl::MutexLock lock(&placement_mutex_);
    pending = pending_;
    vote = pending != nullptr && pending->staged && !pending->cancelled;
    if (vote) ++pending->votes;
  }
  const int64_t current = rank_placement_[rank]->version();
  const int64_t staged = vote ? pending->placement->version() : current;
  // [has work, tokens, stop] (max) and [staged version, current version, -current] (min).
  int64_t maxima[3] = {local_tokens > 0, local_tokens, stop_requested ? 1 : 0};
  int64_t minima[3] = {staged, current, -current};
  comm::Communicator& comm = *resources_[rank]->compute;
  absl::Status reduced = comm.AllReduce(maxima, 3, comm::ReduceOp::kMax);
  if (reduced.ok()) reduced = comm.AllReduce(minima, 3, comm::ReduceOp::kMin);
  if (reduced.ok() && minima[1] != -minima[2]) {
    reduced = absl::InternalError(absl::StrCat("group ", name(),
                                               ": ranks disagree on the placement version (",
                                               minima[1], " vs ", -minima[2], ")"));
  }
  const bool commit = reduced.ok() && vote && minima[0] == pending->placement->version() &&
                      pending->placement->version() > current;
  if (commit) {
    rank_placement_[rank] = pending->placement;
    if (ExpertStager* own = stager(rank); own != nullptr) own->Commit(*pending->placement);
    if (HostExpertStager* host = host_stagers_[rank].get(); host != nullptr) {
      resources_[rank]->expert_weights = host->current();
    }
  }
  if (vote) {
    absl::MutexLock lock(&placement_mutex_);
    --pending->votes;
    // Committed once every local rank switched: from then on an update may start staging again.
    if (commit && ++pending->committed_ranks == static_cast<int>(local_ranks_.size())) {
      committed_ = pending->placement;
      if (pending_ == pending) pending_.reset();
    }
    placement_changed_.SignalAll();
  }
  if (!reduced.ok()) return reduced;
  StepAgreement agreement;
  agreement.any_work = maxima[0] > 0;
  agreement.max_tokens = maxima[1];
  agreement.stop = maxima[2] > 0;
  agreement.split =
      options_.two_batch_overlap && agreement.max_tokens >= options_.overlap_min_tokens;
  agreement.placement_version = rank_placement_[rank]->version();
  return agreement;
}

void ExpertParallelGroup::Stage(std::shared_ptr<PendingPlacement> pending) {
  absl::Status status;
  for (int rank : local_ranks_) {
    ExpertStager* own = stager(rank);
    if (own == nullptr) continue;
    status = own->Stage(*pending->placement);
    if (!status.ok()) break;
  }
  bool discard = !status.ok();
  {
    absl::MutexLock lock(&placement_mutex_);
    if (!status.ok()) {
      if (pending_ == pending) pending_.reset();  // nothing changes
      staging_error_ = status;
    } else if (pending->cancelled) {
      discard = true;  // withdrawn while staging: the canceller left the discard to us
    } else {
      pending->staged = true;
    }
    if (discard) pending->discarded = true;
    placement_changed_.SignalAll();
  }
  if (discard) {
    for (int rank : local_ranks_) {
      if (ExpertStager* own = stager(rank); own != nullptr) own->Discard();
    }
  }
  if (!discard) NotifyWork();  // idle ranks step so the commit happens without traffic
}

void ExpertParallelGroup::DiscardStaged(PendingPlacement& pending) {
  {
    absl::MutexLock lock(&placement_mutex_);
    if (pending.discarded || !pending.staged) return;
    pending.discarded = true;
  }
  for (int rank : local_ranks_) {
    if (ExpertStager* own = stager(rank); own != nullptr) own->Discard();
  }
}

absl::Status ExpertParallelGroup::UpdatePlacement(ExpertPlacement placement,
                                                  std::chrono::milliseconds timeout) {
  RETURN_IF_ERROR(placement.CheckShape(placement_shape()));
  if (!healthy()) return health();
  absl::MutexLock update_lock(&update_mutex_);
  std::shared_ptr<PendingPlacement> pending;
  {
    absl::MutexLock lock(&placement_mutex_);
    const int64_t floor =
        std::max(committed_->version(), pending_ ? pending_->placement->version() : int64_t{0});
    if (placement.version() <= floor) {
      return absl::FailedPreconditionError(absl::StrCat(
          "placement version ", placement.version(), " is stale: the group is at version ", floor));
    }
    if (pending_ != nullptr) {
      return absl::FailedPreconditionError(
          absl::StrCat("placement version ", pending_->placement->version(),
                       " is still being applied; retry after it commits"));
    }
    pending = std::make_shared<PendingPlacement>();
    pending->placement = std::make_shared<const ExpertPlacement>(std::move(placement));
    staging_error_ = absl::OkStatus();
    pending_ = pending;
  }
  const int64_t version = pending->placement->version();
  // The previous staging thread has finished its work (its update committed, failed or was
  // withdrawn); join it before the stagers are used again.
  if (staging_thread_.joinable()) staging_thread_.join();
  // Copy the changed slots' weights while the ranks keep serving with the old placement.
  staging_thread_ = std::thread([this, pending] { Stage(pending); });

  const absl::Time deadline = absl::Now() + absl::FromChrono(timeout);
  enum class Outcome { kCommitted, kStagingFailed, kGroupFailed, kWithdrawn };
  Outcome outcome;
  absl::Status staging_error;
  int64_t kept_version = 0;
  {
    absl::MutexLock lock(&placement_mutex_);
    auto settled = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(placement_mutex_) {
      return committed_->version() >= version || !staging_error_.ok() || failed_.load();
    };
    while (!settled() && !placement_changed_.WaitWithDeadline(&placement_mutex_, deadline)) {
    }
    if (!settled()) {
      // Withdraw it: no rank votes for it from now on. A vote already cast may still commit
      // it, so wait for the votes in flight (one step at most) and answer by what happened.
      pending->cancelled = true;
      while (pending->votes > 0 && !failed_.load()) placement_changed_.Wait(&placement_mutex_);
    }
    if (committed_->version() >= version) {
      outcome = Outcome::kCommitted;
    } else if (!staging_error_.ok()) {
      outcome = Outcome::kStagingFailed;
      staging_error = staging_error_;
    } else {
      outcome = failed_.load() ? Outcome::kGroupFailed : Outcome::kWithdrawn;
      pending->cancelled = true;
      if (pending_ == pending) pending_.reset();
    }
    kept_version = committed_->version();
  }
  switch (outcome) {
    case Outcome::kCommitted:
      return absl::OkStatus();
    case Outcome::kStagingFailed:
      return staging_error;
    case Outcome::kGroupFailed:
      DiscardStaged(*pending);
      return health();
    case Outcome::kWithdrawn:
      break;
  }
  DiscardStaged(*pending);
  return absl::DeadlineExceededError(
      absl::StrCat("placement version ", version,
                   " was not committed within the timeout; it was withdrawn "
                   "and the group keeps version ",
                   kept_version));
}

void ExpertParallelGroup::NotifyWork() {
  absl::MutexLock lock(&work_mutex_);
  ++work_generation_;
  work_available_.SignalAll();
}

void ExpertParallelGroup::WaitForWork(std::chrono::milliseconds timeout) {
  absl::MutexLock lock(&work_mutex_);
  const uint64_t seen = work_generation_;
  const absl::Time deadline = absl::Now() + absl::FromChrono(timeout);
  while (work_generation_ == seen) {
    if (work_available_.WaitWithDeadline(&work_mutex_, deadline)) break;
  }
}

absl::Status ExpertParallelGroup::Fail(int rank, const absl::Status& reason) {
  absl::Status failure;
  {
    absl::MutexLock lock(&health_mutex_);
    if (!failure_.ok()) return failure_;
    failure_ = absl::UnavailableError(absl::StrCat(
        "expert-parallel group `", name(), "` failed: rank ", rank, ": ", reason.message()));
    failed_ = true;
    failure = failure_;
  }
  communicators_->Abort();
  spdlog::error("{}", std::string(failure.message()));
  metrics_.SetHealthy(false);
  if (failure_listener_) failure_listener_(failure);
  NotifyWork();
  {
    absl::MutexLock lock(&placement_mutex_);
    placement_changed_.SignalAll();  // an update waiting for a commit gives up
  }
  return failure;
}

absl::Status ExpertParallelGroup::health() const {
  absl::MutexLock lock(&health_mutex_);
  return failure_;
}

}  // namespace moeserve::engine::parallel
