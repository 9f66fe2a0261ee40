#include "server/cluster_engine.h"

#include <algorithm>
#include <atomic>
#include <list>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "base/random_id.h"
#include "grpcpp/grpcpp.h"
#include "moeserve/v1/admin.grpc.pb.h"
#include "moeserve/v1/worker.grpc.pb.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/registry.h"
#include "server/rendezvous.h"
#include "server/status_conversion.h"
#include "server/worker_conversion.h"
#include "server/worker_service.h"
#include "spdlog/spdlog.h"

namespace moeserve::server {
namespace {

using Clock = std::chrono::steady_clock;

// One rank as the front end sees it: its stubs, its last load report, and this front end's
// requests in flight there.
struct RankView {
  int rank = 0;
  std::string address;
  std::unique_ptr<moeserve::v1::Worker::Stub> worker;
  std::unique_ptr<moeserve::v1::Admin::Stub> admin;
  std::atomic<int> in_flight{0};
  std::atomic<int> reported_load{0};  // running + waiting, last report
};

// One group: its leader, the current formation's members and health.
struct GroupView {
  std::string name;
  std::string leader;
  std::unique_ptr<RendezvousClient> rendezvous;
  std::string epoch;                                               // guarded by the engine's mutex
  int size = 0;                                                    // guarded: the group's ranks
  std::vector<std::shared_ptr<RankView>> ranks;                    // guarded by the engine's mutex
  absl::Status health = absl::UnavailableError("not formed yet");  // guarded
  moeserve::v1::RankLoad totals;                                   // guarded: summed over the ranks
  prometheus::Gauge* healthy_gauge = nullptr;
};

// A request being relayed: the call to cancel when its client gives up.
struct ActiveCall {
  std::shared_ptr<engine::RequestStream> stream;
  absl::Mutex mutex;
  grpc::ClientContext* context ABSL_GUARDED_BY(mutex) = nullptr;
  bool cancelled ABSL_GUARDED_BY(mutex) = false;
  void Attach(grpc::ClientContext* c) {
    absl::MutexLock lock(&mutex);
    context = c;
    if (cancelled && c != nullptr) c->TryCancel();
  }
  void Cancel() {
    absl::MutexLock lock(&mutex);
    cancelled = true;
    if (context != nullptr) context->TryCancel();
  }
};

class ClusterEngine final : public engine::Engine {
 public:
  ClusterEngine(ClusterOptions options, prometheus::Registry* registry);
  ~ClusterEngine() override { Shutdown(); }
  absl::Status Start();

  absl::StatusOr<std::shared_ptr<engine::RequestStream>> Submit(
      engine::GenerationInput input) override;
  engine::EngineStats Stats() const override;
  std::vector<engine::GroupHealth> Health() const override;
  void SetHealthListener(std::function<void(const engine::GroupHealth&)> listener) override {
    absl::MutexLock lock(&listener_mutex_);
    listener_ = std::move(listener);
  }
  const engine::ModelInfo& model_info() const override { return model_info_; }
  const engine::LayoutInfo& layout() const override { return layout_; }
  const std::optional<ChatTemplateSource>& chat_template() const { return chat_template_; }
  absl::StatusOr<engine::PlacementInfo> GetPlacement(const std::string& group) const override;
  absl::StatusOr<engine::PlacementUpdateResult> UpdatePlacement(
      const engine::PlacementUpdate& update) override;
  absl::StatusOr<engine::ExpertLoadWindow> ExpertLoad(const std::string& group,
                                                      double since) const override;
  void StopAccepting() override {
    absl::MutexLock lock(&mutex_);
    accepting_ = false;
  }
  void Shutdown() override;
  absl::Status WriteTrace() const override { return absl::OkStatus(); }

 private:
  GroupView* FindGroup(const std::string& name) const;
  void Poll(GroupView& group);
  void PollLoop();
  void WatchCancellations();
  // The least-loaded rank of a serving group, or UNAVAILABLE with the group's reason.
  absl::StatusOr<std::shared_ptr<RankView>> PickRank(GroupView& group);
  void Relay(std::shared_ptr<ActiveCall> call, engine::GenerationInput input,
             std::shared_ptr<RankView> entry, std::string entry_group,
             std::shared_ptr<RankView> decode, std::string decode_group);
  // Reads a worker stream into the client's; returns the call's end (OK, or why not) and sets
  // `handed_off` when a prefill rank passed the sequence on.
  absl::Status Pump(grpc::ClientReader<moeserve::v1::WorkerGenerateResponse>& reader,
                    grpc::ClientContext& context, engine::RequestStream& stream,
                    const std::string& group, const RankView& rank, bool* handed_off);
  std::vector<std::shared_ptr<RankView>> Ranks(const std::string& group) const;
  void AdminContext(grpc::ClientContext& context, double seconds) const;

  ClusterOptions options_;
  std::vector<std::unique_ptr<GroupView>> groups_;  // entry group first; fixed after Start
  engine::ModelInfo model_info_;
  engine::LayoutInfo layout_;
  std::optional<ChatTemplateSource> chat_template_;
  prometheus::Family<prometheus::Counter>* requests_ = nullptr;

  mutable absl::Mutex mutex_;
  bool accepting_ ABSL_GUARDED_BY(mutex_) = true;
  bool stopping_ ABSL_GUARDED_BY(mutex_) = false;
  std::list<std::shared_ptr<ActiveCall>> calls_ ABSL_GUARDED_BY(mutex_);
  std::atomic<int> relays_running_{0};

  absl::Mutex listener_mutex_;
  std::function<void(const engine::GroupHealth&)> listener_ ABSL_GUARDED_BY(listener_mutex_);

  std::thread poller_;
  std::thread watcher_;
};

ClusterEngine::ClusterEngine(ClusterOptions options, prometheus::Registry* registry)
    : options_(std::move(options)) {
  prometheus::Family<prometheus::Gauge>* healthy = nullptr;
  if (registry != nullptr) {
    healthy = &prometheus::BuildGauge()
                   .Name("moeserve_group_healthy")
                   .Help("1 while the expert-parallel group serves, 0 while it is down")
                   .Register(*registry);
    requests_ = &prometheus::BuildCounter()
                     .Name("moeserve_requests_total")
                     .Help("Finished generation requests by final status")
                     .Register(*registry);
  }
  for (const auto& [name, leader] : options_.groups) {
    auto group = std::make_unique<GroupView>();
    group->name = name;
    group->leader = leader;
    group->rendezvous = std::make_unique<RendezvousClient>(leader);
    if (healthy != nullptr) {
      group->healthy_gauge = &healthy->Add({{"group", name}});
      group->healthy_gauge->Set(0);
    }
    groups_.push_back(std::move(group));
  }
}

GroupView* ClusterEngine::FindGroup(const std::string& name) const {
  for (const auto& group : groups_) {
    if (name.empty() || group->name == name) return group.get();
  }
  return nullptr;
}

absl::Status ClusterEngine::Start() {
  if (groups_.empty()) return absl::InvalidArgumentError("the front end needs at least one group");
  std::vector<std::string> names;
  for (const auto& group : groups_) names.push_back(group->name);
  const bool disaggregated = names == std::vector<std::string>{"prefill", "decode"};
  if (!disaggregated && names != std::vector<std::string>{"mixed"}) {
    return absl::InvalidArgumentError(
        "the front end serves one group `mixed`, or `prefill` then `decode` "
        "(--group mixed=LEADER, or --group prefill=LEADER --group decode=LEADER)");
  }
  // The model comes from the entry group's first rank that answers.
  const auto give_up =
      Clock::now() +
      std::chrono::milliseconds(static_cast<int64_t>(options_.wait_for_groups_seconds * 1000));
  absl::Status last = absl::UnavailableError("no answer yet");
  bool have_info = false;
  while (!have_info && Clock::now() < give_up) {
    for (const auto& group : groups_) Poll(*group);
    for (const auto& rank : Ranks(groups_.front()->name)) {
      grpc::ClientContext context;
      context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
      moeserve::v1::RankInfo info;
      grpc::Status status = rank->worker->GetInfo(&context, {}, &info);
      if (!status.ok()) {
        last = FromGrpcStatus(status);
        continue;
      }
      absl::StatusOr<std::optional<ChatTemplateSource>> chat_template =
          FromChatTemplateProto(info.chat_template());
      if (!chat_template.ok()) return chat_template.status();
      chat_template_ = std::move(*chat_template);
      model_info_ = FromModelInfoProto(info.model());
      layout_.device = info.device();
      layout_.num_redundant_experts = static_cast<int>(info.num_redundant_experts());
      layout_.two_batch_overlap = info.two_batch_overlap();
      have_info = true;
      break;
    }
    if (!have_info) std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  if (!have_info) {
    return absl::DeadlineExceededError(
        absl::StrCat("the front end: group `", groups_.front()->name, "` (leader ",
                     groups_.front()->leader, ") did not answer with its model within ",
                     options_.wait_for_groups_seconds, " s: ", last.message()));
  }
  for (const auto& group : groups_) {
    absl::MutexLock lock(&mutex_);
    const int size = group->size;
    if (group->name == "prefill") layout_.prefill_ep = size;
    if (group->name != "prefill") layout_.decode_ep = size;
    layout_.groups.push_back(group->name);
  }
  // Within the same budget, wait for every group to serve (its ranks may still be loading or
  // forming), so that the ready line means what it says and the first Stats() counts the
  // groups' KV blocks. A group that has not formed by then is reported, and served once it has.
  while (true) {
    for (const auto& group : groups_) Poll(*group);
    std::vector<std::string> waiting;
    for (const auto& group : groups_) {
      absl::MutexLock lock(&mutex_);
      if (!group->health.ok()) waiting.push_back(group->name);
    }
    if (waiting.empty()) break;
    if (Clock::now() >= give_up) {
      spdlog::warn("the front end starts while group(s) {} have not formed yet",
                   absl::StrJoin(waiting, ", "));
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  poller_ = std::thread([this] { PollLoop(); });
  watcher_ = std::thread([this] { WatchCancellations(); });
  return absl::OkStatus();
}

std::vector<std::shared_ptr<RankView>> ClusterEngine::Ranks(const std::string& name) const {
  GroupView* group = FindGroup(name);
  absl::MutexLock lock(&mutex_);
  return group != nullptr ? group->ranks : std::vector<std::shared_ptr<RankView>>{};
}

void ClusterEngine::Poll(GroupView& group) {
  const auto deadline = std::chrono::milliseconds(500);
  absl::StatusOr<moeserve::v1::GroupMembers> members = group.rendezvous->Members(deadline);
  absl::Status health;
  std::vector<std::shared_ptr<RankView>> ranks;
  moeserve::v1::RankLoad totals;
  std::string epoch;
  if (!members.ok()) {
    health = absl::UnavailableError(
        absl::StrCat("expert-parallel group `", group.name, "` is down: its leader at ",
                     group.leader, " does not answer (", members.status().message(), ")"));
  } else {
    epoch = members->epoch();
    {
      absl::MutexLock lock(&mutex_);
      if (epoch == group.epoch) ranks = group.ranks;  // keep the stubs of this formation
    }
    int ready = 0;
    for (const auto& member : members->members()) ready += member.ready() ? 1 : 0;
    if (ranks.size() != members->group_size()) {
      ranks.clear();
      for (const auto& member : members->members()) {
        auto view = std::make_shared<RankView>();
        view->rank = static_cast<int>(member.rank());
        view->address = member.worker_address();
        auto channel = grpc::CreateCustomChannel(view->address, grpc::InsecureChannelCredentials(),
                                                 WorkerChannelArguments());
        view->worker = moeserve::v1::Worker::NewStub(channel);
        view->admin = moeserve::v1::Admin::NewStub(channel);
        ranks.push_back(std::move(view));
      }
      std::sort(ranks.begin(), ranks.end(),
                [](const auto& a, const auto& b) { return a->rank < b->rank; });
    }
    if (ready < static_cast<int>(members->group_size())) {
      health = absl::UnavailableError(absl::StrCat("expert-parallel group `", group.name,
                                                   "` is forming: ", ready, " of ",
                                                   members->group_size(), " ranks ready"));
    }
    for (const auto& rank : ranks) {
      if (!health.ok()) break;
      grpc::ClientContext context;
      context.set_deadline(std::chrono::system_clock::now() + deadline);
      moeserve::v1::RankLoad load;
      grpc::Status status = rank->worker->GetLoad(&context, {}, &load);
      if (!status.ok()) {
        health = absl::UnavailableError(
            absl::StrCat("expert-parallel group `", group.name, "` failed: rank ", rank->rank,
                         " at ", rank->address, " does not answer (", status.error_message(), ")"));
      } else if (load.epoch() != epoch) {
        health = absl::UnavailableError(absl::StrCat("expert-parallel group `", group.name,
                                                     "` is re-forming (rank ", rank->rank,
                                                     " is of another epoch)"));
      } else if (!load.healthy()) {
        health = absl::UnavailableError(load.failure());
      } else {
        rank->reported_load = static_cast<int>(load.running() + load.waiting());
        totals.set_running(totals.running() + load.running());
        totals.set_waiting(totals.waiting() + load.waiting());
        totals.set_kv_blocks_free(totals.kv_blocks_free() + load.kv_blocks_free());
        totals.set_kv_blocks_total(totals.kv_blocks_total() + load.kv_blocks_total());
        if (rank->rank == 0) {
          totals.set_steps(load.steps());
          totals.set_placement_version(load.placement_version());
          totals.set_placement_commit_step(load.placement_commit_step());
        }
      }
    }
  }
  bool changed = false;
  engine::GroupHealth report;
  {
    absl::MutexLock lock(&mutex_);
    changed = health.ok() != group.health.ok();
    group.health = health;
    group.epoch = epoch;
    if (members.ok()) group.size = static_cast<int>(members->group_size());
    group.ranks = ranks;
    group.totals = totals;
    report = {group.name, health};
  }
  if (group.healthy_gauge != nullptr) group.healthy_gauge->Set(health.ok() ? 1 : 0);
  if (!changed) return;
  if (health.ok()) {
    spdlog::info("expert-parallel group `{}` serves (epoch {}, {} ranks)", group.name, epoch,
                 ranks.size());
  } else {
    spdlog::error("{}", std::string(health.message()));
  }
  std::function<void(const engine::GroupHealth&)> listener;
  {
    absl::MutexLock lock(&listener_mutex_);
    listener = listener_;
  }
  if (listener) listener(report);
}

void ClusterEngine::PollLoop() {
  const auto interval =
      std::chrono::milliseconds(static_cast<int64_t>(options_.poll_interval_seconds * 1000));
  while (true) {
    {
      absl::MutexLock lock(&mutex_);
      if (stopping_) return;
    }
    for (const auto& group : groups_) Poll(*group);
    std::this_thread::sleep_for(interval);
  }
}

void ClusterEngine::WatchCancellations() {
  while (true) {
    {
      absl::MutexLock lock(&mutex_);
      if (stopping_ && relays_running_.load() == 0) return;
      for (auto it = calls_.begin(); it != calls_.end();) {
        if ((*it)->stream->cancelled() || stopping_) (*it)->Cancel();
        if ((*it).use_count() == 1) {
          it = calls_.erase(it);  // its relay has ended
        } else {
          ++it;
        }
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

absl::StatusOr<std::shared_ptr<RankView>> ClusterEngine::PickRank(GroupView& group) {
  absl::MutexLock lock(&mutex_);
  if (!group.health.ok()) return group.health;
  std::shared_ptr<RankView> best;
  for (const auto& rank : group.ranks) {
    const int load = rank->reported_load.load() + rank->in_flight.load();
    if (best == nullptr || load < best->reported_load.load() + best->in_flight.load()) {
      best = rank;
    }
  }
  if (best == nullptr) return absl::UnavailableError("the group has no ranks");
  return best;
}

absl::StatusOr<std::shared_ptr<engine::RequestStream>> ClusterEngine::Submit(
    engine::GenerationInput input) {
  auto count = [this](const std::string& status) {
    if (requests_ != nullptr) requests_->Add({{"status", status}}).Increment();
  };
  {
    absl::MutexLock lock(&mutex_);
    if (!accepting_) {
      count("unavailable");
      return absl::UnavailableError("the server is shutting down and accepts no new requests");
    }
  }
  GroupView& entry = *groups_.front();
  absl::StatusOr<std::shared_ptr<RankView>> entry_rank = PickRank(entry);
  if (!entry_rank.ok()) {
    count("unavailable");
    return entry_rank.status();
  }
  std::shared_ptr<RankView> decode_rank;
  std::string decode_group;
  if (groups_.size() > 1) {
    GroupView& decode = *groups_.back();
    absl::StatusOr<std::shared_ptr<RankView>> picked = PickRank(decode);
    if (!picked.ok()) {
      count("unavailable");
      return picked.status();
    }
    decode_rank = *picked;
    decode_group = decode.name;
    input.handoff = engine::HandoffRoute{decode_rank->address, base::RandomHexId()};
  }
  if (input.request_id.empty()) input.request_id = absl::StrCat("req-", base::RandomHexId());
  auto call = std::make_shared<ActiveCall>();
  call->stream = std::make_shared<engine::RequestStream>(input.request_id);
  std::shared_ptr<engine::RequestStream> stream = call->stream;
  absl::MutexLock lock(&mutex_);
  calls_.push_back(call);
  ++relays_running_;
  // One thread per request in flight, as the synchronous gRPC server has; Shutdown waits for
  // them (the watcher cancels them first).
  std::thread([this, call, input = std::move(input), entry = *entry_rank,
               entry_group = groups_.front()->name, decode_rank, decode_group]() mutable {
    Relay(call, std::move(input), entry, entry_group, decode_rank, decode_group);
    call.reset();
    --relays_running_;
  }).detach();
  return stream;
}

absl::Status ClusterEngine::Pump(grpc::ClientReader<moeserve::v1::WorkerGenerateResponse>& reader,
                                 grpc::ClientContext& context, engine::RequestStream& stream,
                                 const std::string& group, const RankView& rank, bool* handed_off) {
  (void)context;
  moeserve::v1::WorkerGenerateResponse response;
  while (reader.Read(&response)) {
    engine::GenerationOutput output = FromWorkerResponse(response);
    if (output.handed_off) {
      *handed_off = true;
      continue;  // the stream goes on from the decode rank
    }
    const bool last = output.is_last();
    stream.Push(std::move(output));
    if (last) break;
  }
  grpc::Status status = reader.Finish();
  if (status.ok()) return absl::OkStatus();
  if (status.error_code() == grpc::StatusCode::UNAVAILABLE &&
      status.error_message().find("expert-parallel group") == std::string::npos) {
    // The rank's process went away mid-stream: its group is failing.
    return absl::UnavailableError(absl::StrCat("expert-parallel group `", group, "` failed: rank ",
                                               rank.rank, " at ", rank.address, " went away (",
                                               status.error_message(), ")"));
  }
  return FromGrpcStatus(status);
}

void ClusterEngine::Relay(std::shared_ptr<ActiveCall> call, engine::GenerationInput input,
                          std::shared_ptr<RankView> entry, std::string entry_group,
                          std::shared_ptr<RankView> decode, std::string decode_group) {
  engine::RequestStream& stream = *call->stream;
  auto fail = [&](const absl::Status& status) {
    engine::GenerationOutput output;
    output.status = status;
    stream.Push(std::move(output));
    if (requests_ != nullptr) {
      requests_->Add({{"status", stream.cancelled() ? "cancelled" : "unavailable"}}).Increment();
    }
  };
  const std::string handoff_id = input.handoff.has_value() ? input.handoff->id : "";
  bool handed_off = false;
  absl::Status status;
  {
    ++entry->in_flight;
    grpc::ClientContext context;
    call->Attach(&context);
    auto reader = entry->worker->Generate(&context, ToWorkerRequest(input));
    status = Pump(*reader, context, stream, entry_group, *entry, &handed_off);
    call->Attach(nullptr);
    --entry->in_flight;
  }
  if (status.ok() && handed_off && decode != nullptr) {
    ++decode->in_flight;
    grpc::ClientContext context;
    call->Attach(&context);
    moeserve::v1::AwaitHandoffRequest request;
    request.set_handoff_id(handoff_id);
    request.set_timeout_ms(60000);
    auto reader = decode->worker->AwaitHandoff(&context, request);
    bool unused = false;
    status = Pump(*reader, context, stream, decode_group, *decode, &unused);
    call->Attach(nullptr);
    --decode->in_flight;
  }
  if (!status.ok()) {
    fail(stream.cancelled() ? absl::CancelledError("the request was cancelled") : status);
  } else if (requests_ != nullptr) {
    requests_->Add({{"status", "ok"}}).Increment();
  }
}

engine::EngineStats ClusterEngine::Stats() const {
  engine::EngineStats stats;
  absl::MutexLock lock(&mutex_);
  for (const auto& group : groups_) {
    stats.running += static_cast<int>(group->totals.running());
    stats.waiting += static_cast<int>(group->totals.waiting());
    stats.kv_blocks_free += static_cast<int>(group->totals.kv_blocks_free());
    stats.kv_blocks_total += static_cast<int>(group->totals.kv_blocks_total());
  }
  stats.steps = groups_.front()->totals.steps();
  stats.placement_version = groups_.front()->totals.placement_version();
  stats.placement_commit_step = groups_.front()->totals.placement_commit_step();
  return stats;
}

std::vector<engine::GroupHealth> ClusterEngine::Health() const {
  std::vector<engine::GroupHealth> result;
  absl::MutexLock lock(&mutex_);
  for (const auto& group : groups_) result.push_back({group->name, group->health});
  return result;
}

void ClusterEngine::AdminContext(grpc::ClientContext& context, double seconds) const {
  context.AddMetadata("authorization", absl::StrCat("Bearer ", options_.admin_token));
  context.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000)));
}

absl::StatusOr<engine::PlacementInfo> ClusterEngine::GetPlacement(const std::string& name) const {
  GroupView* group = FindGroup(name);
  if (group == nullptr) {
    return absl::NotFoundError(absl::StrCat("no group `", name.substr(0, 64), "`"));
  }
  if (options_.admin_token.empty()) {
    return absl::FailedPreconditionError("the front end has no admin token for the ranks");
  }
  std::vector<std::shared_ptr<RankView>> ranks = Ranks(group->name);
  if (ranks.empty()) return absl::UnavailableError("the group is not formed");
  grpc::ClientContext context;
  AdminContext(context, 10);
  moeserve::v1::GetExpertPlacementRequest request;
  request.set_group(group->name);
  moeserve::v1::ExpertPlacement placement;
  grpc::Status status = ranks.front()->admin->GetExpertPlacement(&context, request, &placement);
  if (!status.ok()) return FromGrpcStatus(status);
  engine::PlacementInfo info;
  info.group = placement.group();
  info.version = placement.version();
  info.ep_size = static_cast<int>(placement.ep_size());
  info.num_logical_experts = static_cast<int>(placement.num_logical_experts());
  info.num_physical_experts = static_cast<int>(placement.num_physical_experts());
  info.num_expert_groups = static_cast<int>(placement.num_expert_groups());
  for (const auto& layer : placement.layers()) {
    info.phy2log.emplace_back(layer.phy2log().begin(), layer.phy2log().end());
  }
  return info;
}

absl::StatusOr<engine::PlacementUpdateResult> ClusterEngine::UpdatePlacement(
    const engine::PlacementUpdate& update) {
  GroupView* group = FindGroup(update.group);
  if (group == nullptr) {
    return absl::NotFoundError(absl::StrCat("no group `", update.group.substr(0, 64), "`"));
  }
  if (options_.admin_token.empty()) {
    return absl::FailedPreconditionError("the front end has no admin token for the ranks");
  }
  std::vector<std::shared_ptr<RankView>> ranks = Ranks(group->name);
  if (ranks.empty()) return absl::UnavailableError("the group is not formed");
  moeserve::v1::UpdateExpertPlacementRequest request;
  request.set_group(group->name);
  request.set_version(update.version);
  request.set_timeout_seconds(update.timeout_seconds);
  for (const auto& layer : update.phy2log) {
    auto* out = request.add_layers();
    for (int32_t expert : layer) out->add_phy2log(expert);
  }
  // Every rank stages it; they commit together at the step where all have it.
  const auto start = Clock::now();
  std::vector<grpc::Status> statuses(ranks.size());
  std::vector<int64_t> committed(ranks.size(), 0);
  std::vector<std::thread> threads;
  for (size_t i = 0; i < ranks.size(); ++i) {
    threads.emplace_back([&, i] {
      grpc::ClientContext context;
      AdminContext(context, update.timeout_seconds + 10);
      moeserve::v1::UpdateExpertPlacementResponse response;
      statuses[i] = ranks[i]->admin->UpdateExpertPlacement(&context, request, &response);
      committed[i] = response.committed_version();
    });
  }
  for (auto& thread : threads) thread.join();
  for (size_t i = 0; i < ranks.size(); ++i) {
    if (!statuses[i].ok()) {
      absl::Status status = FromGrpcStatus(statuses[i]);
      return absl::Status(status.code(),
                          absl::StrCat("rank ", ranks[i]->rank, ": ", status.message()));
    }
  }
  engine::PlacementUpdateResult result;
  result.committed_version = committed.front();
  result.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  return result;
}

absl::StatusOr<engine::ExpertLoadWindow> ClusterEngine::ExpertLoad(const std::string& name,
                                                                   double since) const {
  GroupView* group = FindGroup(name);
  if (group == nullptr) {
    return absl::NotFoundError(absl::StrCat("no group `", name.substr(0, 64), "`"));
  }
  if (options_.admin_token.empty()) {
    return absl::FailedPreconditionError("the front end has no admin token for the ranks");
  }
  // Each rank counts the tokens its own slots processed; the group's load is their sum.
  engine::ExpertLoadWindow window;
  window.group = group->name;
  for (const auto& rank : Ranks(group->name)) {
    grpc::ClientContext context;
    AdminContext(context, 10);
    moeserve::v1::GetExpertLoadRequest request;
    request.set_group(group->name);
    request.set_since_unix_seconds(since);
    moeserve::v1::ExpertLoad load;
    grpc::Status status = rank->admin->GetExpertLoad(&context, request, &load);
    if (!status.ok()) return FromGrpcStatus(status);
    window.from_unix_seconds = std::max(window.from_unix_seconds, load.from_unix_seconds());
    window.to_unix_seconds = std::max(window.to_unix_seconds, load.to_unix_seconds());
    if (window.tokens.empty()) window.tokens.resize(load.layers_size());
    for (int layer = 0;
         layer < load.layers_size() && layer < static_cast<int>(window.tokens.size()); ++layer) {
      auto& out = window.tokens[layer];
      out.resize(std::max<size_t>(out.size(), load.layers(layer).tokens_size()), 0);
      for (int e = 0; e < load.layers(layer).tokens_size(); ++e) {
        out[e] += load.layers(layer).tokens(e);
      }
    }
  }
  return window;
}

void ClusterEngine::Shutdown() {
  {
    absl::MutexLock lock(&mutex_);
    accepting_ = false;
    if (stopping_) return;
    stopping_ = true;
  }
  if (poller_.joinable()) poller_.join();
  if (watcher_.joinable()) watcher_.join();  // it cancels every relay and waits for them
}

}  // namespace

absl::StatusOr<ServedEngine> CreateClusterEngine(ClusterOptions options,
                                                 prometheus::Registry* registry) {
  auto engine = std::make_unique<ClusterEngine>(std::move(options), registry);
  if (absl::Status status = engine->Start(); !status.ok()) return status;
  std::optional<ChatTemplateSource> chat_template = engine->chat_template();
  return ServedEngine{std::move(engine), std::move(chat_template)};
}

}  // namespace moeserve::server
