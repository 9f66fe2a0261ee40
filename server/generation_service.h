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

// What GetModelInfo reports about the parallel layout (decided by the serve command).
struct ServingLayout {
  int prefill_ep = 0;
  int decode_ep = 1;
  int num_redundant_experts = 0;
  bool two_batch_overlap = false;
  std::string device = "cpu";
};

class GenerationService final : public moeserve::v1::Generation::Service {
 public:
  explicit GenerationService(ServingLayout layout) : layout_(std::move(layout)) {}

  // Makes the service live; `engine` must outlive the gRPC server.
  void AttachEngine(engine::Engine* engine) { engine_.store(engine); }

  grpc::Status Generate(grpc::ServerContext* context, const moeserve::v1::GenerateRequest* request,
                        grpc::ServerWriter<moeserve::v1::GenerateResponse>* writer) override;
  grpc::Status GetModelInfo(grpc::ServerContext* context,
                            const moeserve::v1::GetModelInfoRequest* request,
                            moeserve::v1::ModelInfo* response) override;

 private:
  ServingLayout layout_;
  std::atomic<engine::Engine*> engine_{nullptr};
};

// Proto → engine input (no validation beyond what the types force; the engine validates).
engine::GenerationInput ToGenerationInput(const moeserve::v1::GenerateRequest& request);

}  // namespace moeserve::server
