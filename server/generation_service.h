// GenerationService: the public `moeserve.v1.Generation` gRPC service over engine::Engine.
//
// Converts protobuf requests to engine inputs and engine outputs to stream messages; stops a
// request's engine work when its client cancels or its deadline passes. Until an engine is
// attached (the model is still loading) calls get UNAVAILABLE. Thread-safe: gRPC calls the
// handlers from many threads.
#pragma once

#include <atomic>

#include "engine/engine.h"
#include "moeserve/v1/generation.grpc.pb.h"

namespace moeserve::server {

class GenerationService final : public moeserve::v1::Generation::Service {
 public:
  // Makes the service live; `engine` must outlive the gRPC server.
  void AttachEngine(engine::Engine* engine) { engine_.store(engine); }

  grpc::Status Generate(grpc::ServerContext* context, const moeserve::v1::GenerateRequest* request,
                        grpc::ServerWriter<moeserve::v1::GenerateResponse>* writer) override;
  grpc::Status GetModelInfo(grpc::ServerContext* context,
                            const moeserve::v1::GetModelInfoRequest* request,
                            moeserve::v1::ModelInfo* response) override;

 private:
  std::atomic<engine::Engine*> engine_{nullptr};
};

}  // namespace moeserve::server
