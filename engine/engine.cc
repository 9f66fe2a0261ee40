#include "engine/engine.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <deque>
#include <filesystem>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "engine/backend/backend_loader.h"
#include "engine/backend/rank_backend.h"
#include "engine/base/status_macros.h"
#include "engine/comm/gloo_communicator.h"
#include "engine/comm/gloo_store.h"
#include "engine/model/builtin_models.h"
#include "engine/model/loader.h"
#include "engine/model/model.h"
#include "engine/parallel/ep_group.h"
#include "engine/runtime/kv_transport.h"
#include "engine/runtime/metrics.h"
#include "engine/runtime/rank_worker.h"
#include "engine/runtime/request_validation.h"
#include "engine/runtime/sequence_handoff.h"
#include "engine/trace/trace_recorder.h"

namespace moeserve::engine {
namespace {

double UnixNow() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// Expert-load snapshots are kept once a second for this long (GetExpertLoad windows).
constexpr size_t kMaxLoadSnapshots = 15 * 60;
// The longest an update may wait for its commit.
constexpr double kMaxPlacementTimeoutSeconds = 3600;

// The options' own consistency, checked before anything is loaded.
absl::Status ValidateOptions(const EngineOptions& options) {
  if (options.max_batch_tokens < 1 || options.max_running_requests < 1 || options.max_queue < 0 ||
      options.kv_block_size < 1) {
    return absl::InvalidArgumentError(
        "engine: max-batch-tokens, max-running-requests and the KV block size must be >= 1 and "
        "max-queue >= 0");
  }
  const ParallelOptions& p = options.parallel;
  if (p.decode_ep < 1 || p.prefill_ep < 0 || p.num_redundant_experts < 0) {
    return absl::InvalidArgumentError(
        "engine: --ep/--decode-ep must be >= 1, --prefill-ep >= 0, --num-redundant-experts >= 0");
  }
  if (!(p.collective_timeout_seconds > 0) || p.collective_timeout_seconds > 86400) {
    return absl::InvalidArgumentError(
        "engine: the collective timeout must be more than 0 and at most 86400 seconds");
  }
  if (options.device != "cpu" && p.prefill_ep > 0) {
    // Two groups of one process would share the GPUs (rank r of each on GPU r).
    return absl::InvalidArgumentError(absl::StrCat(
        "engine: --prefill-ep/--decode-ep disaggregation runs on the CPU only; use --ep N with "
        "--device ",
        options.device));
  }
  return absl::OkStatus();
}

}  // namespace

class LocalEngine final : public Engine {
 public:
  LocalEngine(std::shared_ptr<const Model> model, std::shared_ptr<const Tokenizer> tokenizer,
              EngineOptions options, RankBackendChoice backend, prometheus::Registry* registry);
  ~LocalEngine() override { Shutdown(); }

  absl::Status Start();
  absl::StatusOr<std::shared_ptr<RequestStream>> Submit(GenerationInput input) override;
  absl::StatusOr<std::shared_ptr<RequestStream>> AcceptHandoff(
      const SequenceHandoff& handoff) override;
  EngineStats Stats() const override;
  std::vector<GroupHealth> Health() const override;
  void SetHealthListener(std::function<void(const GroupHealth&)> listener) override;
  const ModelInfo& model_info() const override { return model_info_; }
  const LayoutInfo& layout() const override { return layout_; }
  absl::StatusOr<PlacementInfo> GetPlacement(const std::string& group) const override;
  absl::StatusOr<PlacementUpdateResult> UpdatePlacement(const PlacementUpdate& update) override;
  absl::StatusOr<ExpertLoadWindow> ExpertLoad(const std::string& group,
                                              double since) const override;
  void StopAccepting() override;
  void Shutdown() override;
  absl::Status WriteTrace() const override;

 private:
  struct WorkerGroup {
    std::unique_ptr<parallel::ExpertParallelGroup> group;
    std::vector<std::unique_ptr<RankWorker>> workers;
  };
  struct LoadSnapshot {
    double unix_seconds;
    std::vector<std::vector<std::vector<int64_t>>> per_group;  // [group][layer][expert]
  };

  absl::Status Validate(GenerationInput& input) const;
  // A group of `size` ranks of which this process runs `local_ranks` (all: empty), over `parts`'
  // communicators (default: in-process).
  absl::StatusOr<WorkerGroup> BuildGroup(const std::string& name, int size, GroupRole role,
                                         int trace_pid_offset, parallel::GroupParts parts = {},
                                         std::vector<int> local_ranks = {});
  // The one rank of a group of processes (options_.rank_process).
  absl::Status StartRankProcess();
  // The group named `name` (empty: the entry group), or NOT_FOUND naming the groups.
  absl::StatusOr<int> FindGroup(const std::string& name) const;
  static RankWorker& LeastLoaded(const WorkerGroup& group);
  void HandOff(std::unique_ptr<Sequence> sequence);
  void PublishState();
  void SnapshotLoadLoop();

  std::shared_ptr<const Model> model_;
  std::shared_ptr<const Tokenizer> tokenizer_;
  EngineOptions options_;
  RankBackendChoice backend_;
  EngineMetrics metrics_;
  prometheus::Registry* registry_;
  std::unique_ptr<TraceRecorder> trace_;
  std::atomic<bool> stop_requested_{false};
  std::unique_ptr<KvTransport> kv_transport_;
  WorkerContext context_;
  std::vector<WorkerGroup> groups_;  // entry group first; fixed after Start()
  ModelInfo model_info_;
  LayoutInfo layout_;

  mutable absl::Mutex listener_mutex_;
  std::function<void(const GroupHealth&)> failure_listener_ ABSL_GUARDED_BY(listener_mutex_);

  absl::Mutex submit_mutex_;  // serializes rank choice and queue accounting
  bool accepting_ ABSL_GUARDED_BY(submit_mutex_) = true;
  bool shut_down_ ABSL_GUARDED_BY(submit_mutex_) = false;
  std::atomic<uint64_t> next_request_number_{0};

  mutable absl::Mutex snapshots_mutex_;
  std::deque<LoadSnapshot> snapshots_ ABSL_GUARDED_BY(snapshots_mutex_);  // oldest first
  std::atomic<bool> stop_snapshots_{false};
  std::thread snapshot_thread_;
};

LocalEngine::LocalEngine(std::shared_ptr<const Model> model,
                         std::shared_ptr<const Tokenizer> tokenizer, EngineOptions options,
                         RankBackendChoice backend, prometheus::Registry* registry)
    : model_(std::move(model)),
      tokenizer_(std::move(tokenizer)),
      options_(std::move(options)),
      backend_(std::move(backend)),
      metrics_(registry != nullptr ? EngineMetrics(*registry) : EngineMetrics()),
      registry_(registry) {
  context_.model = model_.get();
  context_.tokenizer = tokenizer_.get();
  context_.metrics = &metrics_;
  context_.max_batch_tokens = options_.max_batch_tokens;
  context_.max_running_requests = options_.max_running_requests;
  context_.min_step_seconds = options_.min_step_seconds;
  context_.stop_requested = &stop_requested_;
  kv_transport_ = std::make_unique<InProcessKvTransport>(
      [this](std::unique_ptr<Sequence> sequence) { HandOff(std::move(sequence)); });
  context_.kv_transport = kv_transport_.get();
  context_.publish_state = [this] { PublishState(); };
  context_.injected_fault = options_.injected_fault;
  if (!options_.parallel.trace_dir.empty()) {
    trace_ = std::make_unique<TraceRecorder>();
    context_.trace_steps = options_.parallel.trace_steps;
    context_.trace_skip_steps = options_.parallel.trace_skip_steps;
    context_.trace_complete = [this] { (void)WriteTrace(); };
  }
  const ModelConfig& c = model_->config();
  model_info_ = {.name = c.name,
                 .architecture = c.model_type,
                 .vocab_size = c.vocab_size,
                 .context_length = c.max_position_embeddings,
                 .num_layers = c.num_hidden_layers,
                 .num_dense_layers = c.num_hidden_layers - c.num_moe_layers(),
                 .hidden_size = c.hidden_size,
                 .num_routed_experts = c.n_routed_experts,
                 .num_shared_experts = c.n_shared_experts,
                 .num_experts_per_token = c.num_experts_per_tok,
                 .num_expert_groups = c.n_group,
                 .num_groups_per_token = c.topk_group,
                 .has_tokenizer = tokenizer_ != nullptr,
                 .eos_token_id = c.eos_token_id};
}

absl::StatusOr<LocalEngine::WorkerGroup> LocalEngine::BuildGroup(const std::string& name, int size,
                                                                 GroupRole role,
                                                                 int trace_pid_offset,
                                                                 parallel::GroupParts parts,
                                                                 std::vector<int> local_ranks) {
  const ModelConfig& c = model_->config();
  const ParallelOptions& p = options_.parallel;
  const int num_logical = std::max(c.n_routed_experts, 1);
  const PlacementShape shape{c.num_moe_layers(), num_logical, num_logical + p.num_redundant_experts,
                             size};
  absl::StatusOr<ExpertPlacement> placement =
      p.placement_file.empty() ? absl::StatusOr<ExpertPlacement>(ExpertPlacement::Default(
                                     shape.num_layers, shape.num_logical, shape.num_physical))
                               : ExpertPlacement::LoadJsonFile(p.placement_file, shape);
  if (!placement.ok()) return placement.status();
  parallel::GroupOptions group_options;
  group_options.name = name;
  group_options.size = size;
  group_options.two_batch_overlap = p.two_batch_overlap;
  group_options.overlap_min_tokens = p.overlap_min_tokens;
  group_options.expert_load_metrics = p.expert_load_metrics;
  group_options.stage_host_expert_weights = !backend_.factory;
  group_options.collective_timeout = std::chrono::milliseconds(
      static_cast<int64_t>(std::ceil(p.collective_timeout_seconds * 1000)));
  auto group = parallel::ExpertParallelGroup::Create(*model_, group_options, std::move(*placement),
                                                     registry_, trace_.get(), trace_pid_offset,
                                                     std::move(parts));
  if (!group.ok()) return group.status();
  (*group)->SetFailureListener([this, name](const absl::Status& failure) {
    std::function<void(const GroupHealth&)> listener;
    {
      absl::MutexLock lock(&listener_mutex_);
      listener = failure_listener_;
    }
    if (listener) listener({name, failure});
    PublishState();
  });
  const int64_t bytes_per_block = static_cast<int64_t>(c.num_hidden_layers) *
                                  options_.kv_block_size * model_->kv_row_dim() *
                                  backend_.kv_element_bytes;
  const int64_t kv_blocks = options_.kv_cache_bytes / bytes_per_block;
  if (kv_blocks < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "engine: the KV cache budget of ", options_.kv_cache_bytes,
        " bytes per rank holds no block (one block needs ", bytes_per_block, " bytes)"));
  }
  WorkerGroup result;
  result.group = std::move(*group);
  if (local_ranks.empty()) local_ranks = result.group->local_ranks();
  for (int rank : local_ranks) {
    absl::StatusOr<std::unique_ptr<RankBackend>> backend = MakeRankBackend(
        backend_.factory,
        {.model = model_.get(),
         .group = result.group.get(),
         .rank = rank,
         .kv_blocks = static_cast<int>(kv_blocks),
         .kv_block_size = options_.kv_block_size,
         .max_batch_tokens = options_.max_batch_tokens,
         .background_placement_staging = p.background_placement_staging,
         .keep_fp8_experts = options_.gpu_fp8_experts,
         .keep_fp8_dense = options_.gpu_fp8_dense,
         .fp8_dispatch = options_.gpu_fp8_dispatch,
         .device_planned_moe = options_.gpu_device_planned_moe,
         .device_planned_exchange = options_.gpu_device_planned_exchange,
         .cuda_graphs = options_.gpu_cuda_graphs,
         .rendezvous =
             options_.rank_process.has_value() ? options_.rank_process->rendezvous.get() : nullptr,
         .rendezvous_prefix = options_.rank_process.has_value()
                                  ? options_.rank_process->rendezvous_prefix
                                  : std::string(),
         .cuda_device = options_.rank_process.has_value() ? options_.rank_process->cuda_device : -1,
         .exchange_max_ctas = options_.gpu_exchange_max_ctas});
    if (!backend.ok()) return backend.status();
    if (ExpertStager* stager = (*backend)->expert_stager(); stager != nullptr) {
      result.group->SetExpertStager(rank, stager);
    }
    result.workers.push_back(std::make_unique<RankWorker>(
        context_, *result.group, rank, role, static_cast<int>(kv_blocks), options_.kv_block_size,
        std::move(*backend)));
  }
  layout_.kv_blocks_per_rank = static_cast<int>(kv_blocks);
  return result;
}

absl::Status LocalEngine::StartRankProcess() {
  const RankProcessOptions& rp = *options_.rank_process;
  GroupRole role = GroupRole::kMixed;
  if (rp.group == "prefill") role = GroupRole::kPrefill;
  if (rp.group == "decode") role = GroupRole::kDecode;
  if (rp.rendezvous == nullptr) {
    return absl::InvalidArgumentError("engine: a rank process needs its group's rendezvous");
  }
  if (role == GroupRole::kPrefill) {
    if (rp.handoff == nullptr) {
      return absl::InvalidArgumentError("engine: a prefill rank process needs a handoff sender");
    }
    kv_transport_ = std::make_unique<RemoteKvTransport>(rp.handoff);
    context_.kv_transport = kv_transport_.get();
  }
  const auto timeout = std::chrono::milliseconds(
      static_cast<int64_t>(std::ceil(options_.parallel.collective_timeout_seconds * 1000)));
  comm::GlooGroupOptions gloo;
  gloo.size = rp.group_size;
  gloo.rank = rp.rank;
  gloo.num_channels = 2;
  gloo.timeout = timeout;
  gloo.hostname = rp.hostname;
  gloo.key_prefix = rp.rendezvous_prefix;
  gloo.form_timeout =
      std::chrono::milliseconds(static_cast<int64_t>(std::ceil(rp.form_timeout_seconds * 1000)));
  ASSIGN_OR_RETURN(std::unique_ptr<comm::GlooCommunicatorGroup> communicators,
                   comm::GlooCommunicatorGroup::Create(
                       std::make_shared<comm::GlooStore>(rp.rendezvous, gloo.form_timeout), gloo));
  parallel::GroupParts parts;
  parts.communicators = std::move(communicators);
  ASSIGN_OR_RETURN(parts.waker,
                   comm::PeerWaker::Create(*rp.rendezvous, rp.rendezvous_prefix, rp.rank,
                                           rp.group_size, rp.hostname, gloo.form_timeout));
  ASSIGN_OR_RETURN(WorkerGroup group,
                   BuildGroup(rp.group, rp.group_size, role, 0, std::move(parts), {rp.rank}));
  groups_.push_back(std::move(group));
  return absl::OkStatus();
}

absl::Status LocalEngine::Start() {
  const ParallelOptions& p = options_.parallel;
  if (options_.rank_process.has_value()) {
    RETURN_IF_ERROR(StartRankProcess());
  } else if (p.prefill_ep > 0) {
    auto prefill = BuildGroup("prefill", p.prefill_ep, GroupRole::kPrefill, 0);
    if (!prefill.ok()) return prefill.status();
    auto decode = BuildGroup("decode", p.decode_ep, GroupRole::kDecode, 1000);
    if (!decode.ok()) return decode.status();
    groups_.push_back(std::move(*prefill));
    groups_.push_back(std::move(*decode));
  } else {
    auto mixed = BuildGroup("mixed", p.decode_ep, GroupRole::kMixed, 0);
    if (!mixed.ok()) return mixed.status();
    groups_.push_back(std::move(*mixed));
  }
  layout_.prefill_ep = p.prefill_ep;
  layout_.decode_ep = p.decode_ep;
  if (options_.rank_process.has_value()) {
    const RankProcessOptions& rp = *options_.rank_process;
    layout_.prefill_ep = rp.group == "prefill" ? rp.group_size : 0;
    layout_.decode_ep = rp.group == "prefill" ? 0 : rp.group_size;
  }
  layout_.num_redundant_experts = p.num_redundant_experts;
  layout_.two_batch_overlap = p.two_batch_overlap;
  layout_.device = backend_.device;
  layout_.kv_block_size = options_.kv_block_size;
  for (const auto& g : groups_) layout_.groups.push_back(g.group->name());
  if (options_.injected_fault.has_value() && !FindGroup(options_.injected_fault->group).ok()) {
    return absl::InvalidArgumentError(absl::StrCat("--inject-fault names group `",
                                                   options_.injected_fault->group,
                                                   "`, which this layout does not have"));
  }
  for (auto& group : groups_) {
    for (auto& worker : group.workers) worker->Start();
  }
  PublishState();
  snapshot_thread_ = std::thread([this] { SnapshotLoadLoop(); });
  return absl::OkStatus();
}

void LocalEngine::SnapshotLoadLoop() {
  while (!stop_snapshots_.load()) {
    LoadSnapshot snapshot{UnixNow(), {}};
    for (const auto& g : groups_) snapshot.per_group.push_back(g.group->load().Snapshot());
    {
      absl::MutexLock lock(&snapshots_mutex_);
      snapshots_.push_back(std::move(snapshot));
      if (snapshots_.size() > kMaxLoadSnapshots) snapshots_.pop_front();
    }
    for (int i = 0; i < 10 && !stop_snapshots_.load(); ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  }
}

absl::StatusOr<int> LocalEngine::FindGroup(const std::string& name) const {
  std::string known;
  for (size_t i = 0; i < groups_.size(); ++i) {
    if (name.empty() || groups_[i].group->name() == name) return static_cast<int>(i);
    absl::StrAppend(&known, known.empty() ? "" : ", ", groups_[i].group->name());
  }
  // Echo at most a short prefix of what the caller sent.
  const std::string shown = name.size() > 64 ? name.substr(0, 64) + "..." : name;
  return absl::NotFoundError(absl::StrCat("no group `", shown, "` (groups: ", known, ")"));
}

absl::StatusOr<PlacementInfo> LocalEngine::GetPlacement(const std::string& name) const {
  ASSIGN_OR_RETURN(const int index, FindGroup(name));
  const parallel::ExpertParallelGroup& group = *groups_[index].group;
  const std::shared_ptr<const ExpertPlacement> placement = group.committed_placement();
  PlacementInfo info;
  info.group = group.name();
  info.version = placement->version();
  info.ep_size = group.size();
  info.num_logical_experts = placement->num_logical();
  info.num_physical_experts = placement->num_physical();
  info.num_expert_groups = model_->config().n_group;
  for (int layer = 0; layer < placement->num_layers(); ++layer) {
    info.phy2log.push_back(placement->phy2log(layer));
  }
  return info;
}

absl::StatusOr<PlacementUpdateResult> LocalEngine::UpdatePlacement(const PlacementUpdate& update) {
  absl::StatusOr<int> index = FindGroup(update.group);
  if (!index.ok()) return index.status();
  if (!(update.timeout_seconds > 0) || update.timeout_seconds > kMaxPlacementTimeoutSeconds) {
    return absl::InvalidArgumentError(absl::StrCat(
        "timeout_seconds must be more than 0 and at most ", kMaxPlacementTimeoutSeconds,
        " (0 or unset: 60), got ", update.timeout_seconds));
  }
  parallel::ExpertParallelGroup& group = *groups_[*index].group;
  absl::StatusOr<ExpertPlacement> placement =
      ExpertPlacement::Create(update.phy2log, update.version, group.placement_shape());
  if (!placement.ok()) return placement.status();
  const auto start = std::chrono::steady_clock::now();
  absl::Status status = group.UpdatePlacement(
      std::move(*placement),
      std::chrono::milliseconds(static_cast<int64_t>(std::ceil(update.timeout_seconds * 1000))));
  if (!status.ok()) return status;
  PlacementUpdateResult result;
  result.committed_version = group.committed_placement()->version();
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return result;
}

absl::StatusOr<ExpertLoadWindow> LocalEngine::ExpertLoad(const std::string& name,
                                                         double since) const {
  absl::StatusOr<int> index = FindGroup(name);
  if (!index.ok()) return index.status();
  const parallel::ExpertParallelGroup& group = *groups_[*index].group;
  const auto now = group.load().Snapshot();
  std::vector<std::vector<int64_t>> base(now.size(),
                                         std::vector<int64_t>(now.empty() ? 0 : now[0].size(), 0));
  ExpertLoadWindow window;
  window.group = group.name();
  if (since > 0) {
    absl::MutexLock lock(&snapshots_mutex_);
    // The latest snapshot taken at or before `since` (or the oldest one kept).
    for (const LoadSnapshot& snapshot : snapshots_) {
      if (snapshot.unix_seconds > since && window.from_unix_seconds != 0) break;
      base = snapshot.per_group[*index];
      window.from_unix_seconds = snapshot.unix_seconds;
    }
  }
  window.to_unix_seconds = UnixNow();
  window.tokens = now;
  for (size_t layer = 0; layer < now.size(); ++layer) {
    for (size_t expert = 0; expert < now[layer].size(); ++expert) {
      window.tokens[layer][expert] -= base[layer][expert];
    }
  }
  return window;
}

void LocalEngine::StopAccepting() {
  absl::MutexLock lock(&submit_mutex_);
  accepting_ = false;
}

void LocalEngine::Shutdown() {
  {
    absl::MutexLock lock(&submit_mutex_);
    accepting_ = false;
    if (shut_down_) return;
    shut_down_ = true;
  }
  stop_snapshots_ = true;
  if (snapshot_thread_.joinable()) snapshot_thread_.join();
  stop_requested_ = true;
  for (auto& group : groups_) group.group->NotifyWork();
  for (auto& group : groups_) {
    for (auto& worker : group.workers) worker->Join();
  }
  // Sequences handed to a decode rank after it stopped, or never admitted.
  for (auto& group : groups_) {
    for (auto& worker : group.workers) worker->AbortQueued();
  }
  PublishState();
  if (trace_ != nullptr) (void)WriteTrace();
}

absl::Status LocalEngine::WriteTrace() const {
  if (trace_ == nullptr) return absl::OkStatus();
  std::error_code error;
  std::filesystem::create_directories(options_.parallel.trace_dir, error);
  return trace_->WriteJson(options_.parallel.trace_dir + "/moeserve-trace.json");
}

std::vector<GroupHealth> LocalEngine::Health() const {
  std::vector<GroupHealth> result;
  for (const auto& g : groups_) result.push_back({g.group->name(), g.group->health()});
  return result;
}

void LocalEngine::SetHealthListener(std::function<void(const GroupHealth&)> listener) {
  absl::MutexLock lock(&listener_mutex_);
  failure_listener_ = std::move(listener);
}

EngineStats LocalEngine::Stats() const {
  EngineStats stats;
  if (!groups_.empty()) {
    const parallel::ExpertParallelGroup& entry = *groups_.front().group;
    const int rank = entry.local_ranks().front();
    stats.steps = entry.steps(rank);
    stats.placement_version = entry.committed_placement()->version();
    stats.placement_commit_step = entry.placement_commit_step(rank);
  }
  for (const auto& group : groups_) {
    for (const auto& worker : group.workers) {
      stats.running += worker->running();
      stats.waiting += worker->queued();
      stats.kv_blocks_total += worker->kv_blocks_total();
      stats.kv_blocks_free += worker->kv_blocks_free();
      stats.seconds_since_progress =
          std::max(stats.seconds_since_progress, worker->seconds_since_progress());
    }
  }
  return stats;
}

void LocalEngine::PublishState() {
  const EngineStats stats = Stats();
  metrics_.SetQueueState(
      stats.running, stats.waiting,
      stats.kv_blocks_total > 0
          ? 1.0 - static_cast<double>(stats.kv_blocks_free) / stats.kv_blocks_total
          : 0.0);
}

RankWorker& LocalEngine::LeastLoaded(const WorkerGroup& group) {
  // Fewest running + queued sequences; ties go to the rank with more free KV blocks.
  RankWorker* best = group.workers.front().get();
  for (const auto& worker : group.workers) {
    if (worker->load() < best->load() ||
        (worker->load() == best->load() && worker->kv_blocks_free() > best->kv_blocks_free())) {
      best = worker.get();
    }
  }
  return *best;
}

void LocalEngine::HandOff(std::unique_ptr<Sequence> sequence) {
  LeastLoaded(groups_.back()).Enqueue(std::move(sequence));
}

absl::Status LocalEngine::Validate(GenerationInput& in) const {
  const ModelConfig& c = model_->config();
  RequestLimits limits;
  limits.vocab_size = c.vocab_size;
  limits.context_length = c.max_position_embeddings;
  limits.max_request_id_bytes = options_.max_request_id_bytes;
  limits.max_stop_strings = options_.max_stop_strings;
  limits.max_stop_string_bytes = options_.max_stop_string_bytes;
  limits.kv_block_size = options_.kv_block_size;
  for (const auto& group : groups_) {
    for (const auto& worker : group.workers) {
      if (limits.kv_blocks_per_rank == 0 || worker->kv_blocks_total() < limits.kv_blocks_per_rank) {
        limits.kv_blocks_per_rank = worker->kv_blocks_total();
      }
    }
  }
  return ValidateGenerationInput(in, limits, tokenizer_.get());
}

absl::StatusOr<std::shared_ptr<RequestStream>> LocalEngine::AcceptHandoff(
    const SequenceHandoff& handoff) {
  if (!options_.rank_process.has_value() || options_.rank_process->group != "decode") {
    return absl::UnimplementedError("this engine takes no handoffs (not a decode rank process)");
  }
  if (absl::Status health = groups_.front().group->health(); !health.ok()) {
    metrics_.RequestFinished("unavailable");
    return health;
  }
  ASSIGN_OR_RETURN(std::unique_ptr<Sequence> sequence, FromHandoff(handoff));
  const int blocks =
      BlocksFor(sequence->prompt_length + sequence->input.max_tokens, options_.kv_block_size);
  if (blocks > groups_.front().workers.front()->kv_blocks_total()) {
    return absl::ResourceExhaustedError(
        absl::StrCat("the handed-off sequence needs ", blocks, " KV blocks; this decode rank has ",
                     groups_.front().workers.front()->kv_blocks_total()));
  }
  std::shared_ptr<RequestStream> stream = sequence->stream;
  LeastLoaded(groups_.front()).Enqueue(std::move(sequence));
  PublishState();
  return stream;
}

absl::StatusOr<std::shared_ptr<RequestStream>> LocalEngine::Submit(GenerationInput input) {
  if (options_.rank_process.has_value() && options_.rank_process->group == "prefill" &&
      !input.handoff.has_value()) {
    metrics_.RequestFinished("invalid_argument");
    return absl::InvalidArgumentError(
        "a prefill rank takes requests with a handoff route only: send requests through the "
        "front end (moeserve frontend)");
  }
  if (absl::Status status = Validate(input); !status.ok()) {
    metrics_.RequestFinished("invalid_argument");
    return status;
  }
  auto sequence = std::make_unique<Sequence>();
  sequence->arrival = Sequence::Clock::now();
  if (input.request_id.empty()) {
    input.request_id = absl::StrCat("req-", next_request_number_.fetch_add(1));
  }
  sequence->stream = std::make_shared<RequestStream>(input.request_id);
  // Validated: every id fits the vocabulary, so int32.
  sequence->tokens.assign(input.prompt_tokens.begin(), input.prompt_tokens.end());
  sequence->prompt_length = static_cast<int>(input.prompt_tokens.size());
  sequence->sampler = std::make_unique<Sampler>(input.sampling);
  sequence->input = std::move(input);
  std::shared_ptr<RequestStream> stream = sequence->stream;
  {
    absl::MutexLock lock(&submit_mutex_);
    if (!accepting_) {
      metrics_.RequestFinished("unavailable");
      return absl::UnavailableError("the server is shutting down and accepts no new requests");
    }
    // Every group a request passes through must serve (the entry group, and the decode group a
    // prefill group hands it to).
    for (const auto& group : groups_) {
      if (absl::Status health = group.group->health(); !health.ok()) {
        metrics_.RequestFinished("unavailable");
        return health;
      }
    }
    int queued = 0;
    for (const auto& group : groups_) {
      for (const auto& worker : group.workers) queued += worker->queued();
    }
    if (queued >= options_.max_queue) {
      metrics_.RequestFinished("queue_full");
      return absl::ResourceExhaustedError(absl::StrCat(
          "the waiting queue is full (", options_.max_queue, " requests); retry later"));
    }
    LeastLoaded(groups_.front()).Enqueue(std::move(sequence));
  }
  PublishState();
  return stream;
}

// --- Engine ----------------------------------------------------------------------------------

namespace {

absl::StatusOr<std::unique_ptr<Engine>> StartLocalEngine(std::shared_ptr<const Model> model,
                                                         std::shared_ptr<const Tokenizer> tokenizer,
                                                         EngineOptions options,
                                                         RankBackendChoice backend,
                                                         prometheus::Registry* registry) {
  const ParallelOptions& p = options.parallel;
  if (!backend.factory && !model->has_host_weights()) {
    return absl::FailedPreconditionError(
        "engine: the model's weights are not in host memory (loaded for a GPU backend); the CPU "
        "engine cannot run it");
  }
  if (model->config().n_routed_experts == 0 && p.num_redundant_experts > 0) {
    return absl::InvalidArgumentError("engine: the model has no routed experts to replicate");
  }
  // Every running request decodes one token per step, so they must fit in one step.
  options.max_running_requests = std::min(options.max_running_requests, options.max_batch_tokens);
  auto engine = std::make_unique<LocalEngine>(std::move(model), std::move(tokenizer),
                                              std::move(options), std::move(backend), registry);
  RETURN_IF_ERROR(engine->Start());
  return std::unique_ptr<Engine>(std::move(engine));
}

}  // namespace

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(EngineOptions options,
                                                       prometheus::Registry* registry) {
  RETURN_IF_ERROR(ValidateOptions(options));
  RETURN_IF_ERROR(CheckModelRunsOn(options.model, options.device));
  // The backend before the model: a missing GPU backend is reported before a long load.
  ASSIGN_OR_RETURN(RankBackendChoice backend, ChooseRankBackend(options.device));
  // A GPU backend reads each rank's share of a checkpoint straight from the mapped files; only
  // the CPU engine needs the weights in host memory.
  LoadOptions load_options;
  load_options.host_weights = !backend.factory;
  ASSIGN_OR_RETURN(LoadedModel loaded, LoadModel(options.model, load_options));
  return StartLocalEngine(std::move(loaded.model), std::move(loaded.tokenizer), std::move(options),
                          std::move(backend), registry);
}

absl::StatusOr<std::unique_ptr<Engine>> Engine::CreateWithModel(
    std::shared_ptr<const Model> model, std::shared_ptr<const Tokenizer> tokenizer,
    EngineOptions options, prometheus::Registry* registry) {
  RETURN_IF_ERROR(ValidateOptions(options));
  ASSIGN_OR_RETURN(RankBackendChoice backend, ChooseRankBackend(options.device));
  return StartLocalEngine(std::move(model), std::move(tokenizer), std::move(options),
                          std::move(backend), registry);
}

absl::Status CheckModelRunsOn(const std::string& model, const std::string& device) {
  if (device == "cuda" || !model.starts_with("builtin:")) return absl::OkStatus();
  absl::StatusOr<ModelConfig> config = BuiltinModelConfig(model);
  if (config.ok() && config->routed_experts_on_device) {
    return absl::InvalidArgumentError(
        absl::StrCat("`", model, "` keeps its routed experts on GPUs only; use --device cuda"));
  }
  return absl::OkStatus();
}

}  // namespace moeserve::engine
