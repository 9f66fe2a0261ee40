#include "server/worker_service.h"

#include <chrono>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "server/status_conversion.h"
#include "server/stream_relay.h"
#include "server/worker_conversion.h"

namespace moeserve::server {
namespace {

// How long a handed-over sequence waits for its front end's call before it is cancelled.
constexpr absl::Duration kUnclaimedArrival = absl::Seconds(60);

grpc::Status NotReady() {
  return grpc::Status(grpc::StatusCode::UNAVAILABLE,
                      "this rank is still forming its group or loading its model");
}

}  // namespace

grpc::ChannelArguments WorkerChannelArguments() {
  grpc::ChannelArguments arguments;
  arguments.SetMaxReceiveMessageSize(kWorkerMaxMessageBytes);
  arguments.SetMaxSendMessageSize(kWorkerMaxMessageBytes);
  return arguments;
}

WorkerService::WorkerService(RankIdentity identity, std::optional<ChatTemplateSource> chat_template)
    : chat_template_(std::move(chat_template)), identity_(std::move(identity)) {}

void WorkerService::SetEpoch(std::string epoch) {
  absl::MutexLock lock(&identity_mutex_);
  identity_.epoch = std::move(epoch);
}

RankIdentity WorkerService::identity() const {
  absl::MutexLock lock(&identity_mutex_);
  return identity_;
}

WorkerService::~WorkerService() {
  absl::MutexLock lock(&arrivals_mutex_);
  for (auto& [id, arrival] : arrivals_) arrival.stream->Cancel();
}

grpc::Status WorkerService::Generate(
    grpc::ServerContext* context, const moeserve::v1::WorkerGenerateRequest* request,
    grpc::ServerWriter<moeserve::v1::WorkerGenerateResponse>* writer) {
  engine::Engine* engine = engine_.load();
  if (engine == nullptr) return NotReady();
  absl::StatusOr<std::shared_ptr<engine::RequestStream>> stream =
      engine->Submit(FromWorkerRequest(*request));
  if (!stream.ok()) return ToGrpcStatus(stream.status());
  return RelayStream(context, **stream, writer, ToWorkerResponse, "the rank", "the front end");
}

grpc::Status WorkerService::Handoff(grpc::ServerContext*,
                                    const moeserve::v1::HandoffMessage* request,
                                    moeserve::v1::HandoffResponse*) {
  engine::Engine* engine = engine_.load();
  if (engine == nullptr) return NotReady();
  if (request->handoff_id().empty()) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "a handoff needs an id");
  }
  absl::StatusOr<std::shared_ptr<engine::RequestStream>> stream =
      engine->AcceptHandoff(FromHandoffMessage(*request));
  if (!stream.ok()) return ToGrpcStatus(stream.status());
  absl::MutexLock lock(&arrivals_mutex_);
  ExpireArrivals();
  arrivals_[request->handoff_id()] = {*stream, absl::Now()};
  arrived_.SignalAll();
  return grpc::Status::OK;
}

void WorkerService::ExpireArrivals() {
  const absl::Time now = absl::Now();
  for (auto it = arrivals_.begin(); it != arrivals_.end();) {
    if (now - it->second.arrived > kUnclaimedArrival) {
      it->second.stream->Cancel();
      it = arrivals_.erase(it);
    } else {
      ++it;
    }
  }
}

grpc::Status WorkerService::AwaitHandoff(
    grpc::ServerContext* context, const moeserve::v1::AwaitHandoffRequest* request,
    grpc::ServerWriter<moeserve::v1::WorkerGenerateResponse>* writer) {
  if (engine_.load() == nullptr) return NotReady();
  const absl::Time deadline =
      absl::Now() + absl::Milliseconds(std::min<uint32_t>(request->timeout_ms(), 600000));
  std::shared_ptr<engine::RequestStream> stream;
  {
    absl::MutexLock lock(&arrivals_mutex_);
    while (true) {
      auto it = arrivals_.find(request->handoff_id());
      if (it != arrivals_.end()) {
        stream = it->second.stream;
        arrivals_.erase(it);
        break;
      }
      if (context->IsCancelled() || absl::Now() >= deadline) break;
      arrived_.WaitWithDeadline(&arrivals_mutex_,
                                std::min(deadline, absl::Now() + absl::Milliseconds(100)));
    }
  }
  if (stream == nullptr) {
    return grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED,
                        "no sequence arrived from the prefill group in time");
  }
  return RelayStream(context, *stream, writer, ToWorkerResponse, "the rank", "the front end");
}

grpc::Status WorkerService::GetLoad(grpc::ServerContext*, const moeserve::v1::GetLoadRequest*,
                                    moeserve::v1::RankLoad* response) {
  const RankIdentity identity = this->identity();
  response->set_group(identity.group);
  response->set_rank(static_cast<uint32_t>(identity.rank));
  response->set_epoch(identity.epoch);
  engine::Engine* engine = engine_.load();
  if (engine == nullptr) {
    response->set_healthy(false);
    response->set_failure("loading");
    return grpc::Status::OK;
  }
  const engine::EngineStats stats = engine->Stats();
  bool healthy = true;
  std::string failure;
  for (const engine::GroupHealth& group : engine->Health()) {
    if (!group.status.ok()) {
      healthy = false;
      failure = std::string(group.status.message());
    }
  }
  response->set_healthy(healthy);
  response->set_failure(failure);
  response->set_running(static_cast<uint32_t>(stats.running));
  response->set_waiting(static_cast<uint32_t>(stats.waiting));
  response->set_kv_blocks_free(static_cast<uint32_t>(stats.kv_blocks_free));
  response->set_kv_blocks_total(static_cast<uint32_t>(stats.kv_blocks_total));
  response->set_steps(stats.steps);
  response->set_placement_version(stats.placement_version);
  response->set_placement_commit_step(stats.placement_commit_step);
  return grpc::Status::OK;
}

grpc::Status WorkerService::GetInfo(grpc::ServerContext*, const moeserve::v1::GetInfoRequest*,
                                    moeserve::v1::RankInfo* response) {
  engine::Engine* engine = engine_.load();
  if (engine == nullptr) return NotReady();
  ToModelInfoProto(engine->model_info(), response->mutable_model());
  const RankIdentity identity = this->identity();
  response->set_group(identity.group);
  response->set_rank(static_cast<uint32_t>(identity.rank));
  response->set_group_size(static_cast<uint32_t>(identity.group_size));
  response->set_epoch(identity.epoch);
  const engine::LayoutInfo& layout = engine->layout();
  response->set_device(layout.device);
  response->set_num_redundant_experts(static_cast<uint32_t>(layout.num_redundant_experts));
  response->set_two_batch_overlap(layout.two_batch_overlap);
  ToChatTemplateProto(chat_template_, response->mutable_chat_template());
  return grpc::Status::OK;
}

absl::Status GrpcHandoffSender::Send(const engine::SequenceHandoff& handoff) {
  moeserve::v1::Worker::Stub* stub = nullptr;
  {
    absl::MutexLock lock(&mutex_);
    auto& entry = stubs_[handoff.target];
    if (entry == nullptr) {
      entry = moeserve::v1::Worker::NewStub(grpc::CreateCustomChannel(
          handoff.target, grpc::InsecureChannelCredentials(), WorkerChannelArguments()));
    }
    stub = entry.get();
  }
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  moeserve::v1::HandoffResponse response;
  grpc::Status status = stub->Handoff(&context, ToHandoffMessage(handoff), &response);
  if (!status.ok()) {
    return absl::UnavailableError(
        absl::StrCat("the decode rank at ", handoff.target,
                     " did not take the sequence: ", status.error_message()));
  }
  return absl::OkStatus();
}

}  // namespace moeserve::server
