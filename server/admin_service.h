// AdminService: the `moeserve.v1.Admin` gRPC service — read and replace a group's expert
// placement (live: staged while serving, committed by all ranks at one step boundary) and read
// its expert load. With a token (read once from --admin-token-file, server/admin_token.h) every
// call must carry `authorization: Bearer <token>`; without one the service is served only on a
// port that requires verified client certificates (server/serve.h). Thread-safe.
#pragma once

#include <atomic>
#include <optional>
#include <string>

#include "engine/engine.h"
#include "moeserve/v1/admin.grpc.pb.h"

namespace moeserve::server {

class AdminService final : public moeserve::v1::Admin::Service {
 public:
  // `token`: the bearer token every call must carry; none: the listener authenticates clients.
  explicit AdminService(std::optional<std::string> token) : token_(std::move(token)) {}

  // Makes the service live; `engine` must outlive the service.
  void AttachEngine(engine::Engine* engine) { engine_.store(engine); }

  grpc::Status GetExpertPlacement(grpc::ServerContext* context,
                                  const moeserve::v1::GetExpertPlacementRequest* request,
                                  moeserve::v1::ExpertPlacement* response) override;
  grpc::Status UpdateExpertPlacement(
      grpc::ServerContext* context, const moeserve::v1::UpdateExpertPlacementRequest* request,
      moeserve::v1::UpdateExpertPlacementResponse* response) override;
  grpc::Status GetExpertLoad(grpc::ServerContext* context,
                             const moeserve::v1::GetExpertLoadRequest* request,
                             moeserve::v1::ExpertLoad* response) override;

 private:
  // OK with the engine, or UNAUTHENTICATED / UNAVAILABLE (still loading).
  grpc::Status Authorize(const grpc::ServerContext& context, engine::Engine** engine) const;

  std::optional<std::string> token_;
  std::atomic<engine::Engine*> engine_{nullptr};
};

}  // namespace moeserve::server
