// WorkerService: the internal Worker API (proto/moeserve/v1/worker.proto) of one rank process,
// over its engine (a LocalEngine running one rank of its group): generations submitted by the
// cluster front end, sequences handed over from prefill ranks and the streams that await
// them, load and identity reports. GrpcHandoffSender is a prefill rank's way to a decode rank's
// WorkerService.
//
// Thread-safe: gRPC calls the handlers from many threads.
#pragma once

#include <atomic>
#include <map>
#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "engine/api/handoff.h"
#include "engine/engine.h"
#include "grpcpp/grpcpp.h"
#include "moeserve/v1/worker.grpc.pb.h"
#include "server/chat_template.h"

namespace moeserve::server {

// Where a rank process sits in its group.
struct RankIdentity {
  std::string group;
  int rank = 0;
  int group_size = 1;
  std::string epoch;
};

class WorkerService final : public moeserve::v1::Worker::Service {
 public:
  // `chat_template`: the model's, which GetInfo passes on to the front end's OpenAI door.
  WorkerService(RankIdentity identity, std::optional<ChatTemplateSource> chat_template);
  ~WorkerService() override;
  // The group's epoch, once the rank joined it.
  void SetEpoch(std::string epoch);
  // Makes the service live; `engine` must outlive the gRPC server. Until then: UNAVAILABLE.
  void AttachEngine(engine::Engine* engine) { engine_.store(engine); }

  grpc::Status Generate(grpc::ServerContext* context,
                        const moeserve::v1::WorkerGenerateRequest* request,
                        grpc::ServerWriter<moeserve::v1::WorkerGenerateResponse>* writer) override;
  grpc::Status AwaitHandoff(
      grpc::ServerContext* context, const moeserve::v1::AwaitHandoffRequest* request,
      grpc::ServerWriter<moeserve::v1::WorkerGenerateResponse>* writer) override;
  grpc::Status Handoff(grpc::ServerContext* context, const moeserve::v1::HandoffMessage* request,
                       moeserve::v1::HandoffResponse* response) override;
  grpc::Status GetLoad(grpc::ServerContext* context, const moeserve::v1::GetLoadRequest* request,
                       moeserve::v1::RankLoad* response) override;
  grpc::Status GetInfo(grpc::ServerContext* context, const moeserve::v1::GetInfoRequest* request,
                       moeserve::v1::RankInfo* response) override;

 private:
  // A handed-over sequence's stream until its awaiting call takes it.
  struct Arrival {
    std::shared_ptr<engine::RequestStream> stream;
    absl::Time arrived;
  };
  // Cancels arrivals nobody awaited (their front end went away).
  void ExpireArrivals() ABSL_EXCLUSIVE_LOCKS_REQUIRED(arrivals_mutex_);

  RankIdentity identity() const;

  const std::optional<ChatTemplateSource> chat_template_;
  mutable absl::Mutex identity_mutex_;
  RankIdentity identity_ ABSL_GUARDED_BY(identity_mutex_);
  std::atomic<engine::Engine*> engine_{nullptr};
  absl::Mutex arrivals_mutex_;
  absl::CondVar arrived_;
  std::map<std::string, Arrival> arrivals_ ABSL_GUARDED_BY(arrivals_mutex_);
};

// A prefill rank's HandoffSender: the Handoff call of the decode rank a sequence's route names.
class GrpcHandoffSender : public engine::HandoffSender {
 public:
  absl::Status Send(const engine::SequenceHandoff& handoff) override;

 private:
  absl::Mutex mutex_;
  std::map<std::string, std::unique_ptr<moeserve::v1::Worker::Stub>> stubs_ ABSL_GUARDED_BY(mutex_);
};

// Channel arguments for the worker API: KV rows of long prompts travel in one message.
grpc::ChannelArguments WorkerChannelArguments();
inline constexpr int kWorkerMaxMessageBytes = 1 << 30;

}  // namespace moeserve::server
