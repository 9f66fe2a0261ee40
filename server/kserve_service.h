// KServeService: the KServe v2 inference protocol (`inference.GRPCInferenceService`, as
// Triton serves it, including its decoupled ModelStreamInfer) over engine::Engine, on the same
// gRPC port as moeserve.v1.Generation. The served model is the engine's model name (e.g.
// `builtin:tiny`), version "1".
//
// Tensors, named as Triton's LLM backends name them (each of one element unless said):
//   inputs   text_input BYTES (or input_ids INT32/INT64 [-1], token ids), max_tokens INT32,
//            stream BOOL, temperature FP32, top_p FP32, top_k INT32, random_seed UINT64,
//            stop_words BYTES [-1], ignore_eos BOOL, exclude_input_in_output BOOL,
//            sampling_parameters BYTES (a JSON object with the same names, vLLM-style; `seed`
//            and `stop` also accepted); any integer or float width is accepted where the type
//            says INT or FP.
//   outputs  text_output BYTES [1]: the generated text (or, with stream, its next piece); the
//            last response's parameters carry finish_reason ("stop" or "length"),
//            prompt_tokens and completion_tokens.
// Unknown inputs or outputs, a batch of more than one prompt, and wrong types are
// INVALID_ARGUMENT naming the tensor.
//
// Until an engine is attached every inference call gets UNAVAILABLE and readiness is false.
// Thread-safe: gRPC calls the handlers from many threads.
#pragma once

#include <atomic>

#include "engine/engine.h"
#include "inference/grpc_service.grpc.pb.h"

namespace moeserve::server {

class KServeService final : public inference::GRPCInferenceService::Service {
 public:
  // Makes the service live; `engine` must outlive the gRPC server.
  void AttachEngine(engine::Engine* engine) { engine_.store(engine); }

  grpc::Status ServerLive(grpc::ServerContext* context, const inference::ServerLiveRequest* request,
                          inference::ServerLiveResponse* response) override;
  grpc::Status ServerReady(grpc::ServerContext* context,
                           const inference::ServerReadyRequest* request,
                           inference::ServerReadyResponse* response) override;
  grpc::Status ModelReady(grpc::ServerContext* context, const inference::ModelReadyRequest* request,
                          inference::ModelReadyResponse* response) override;
  grpc::Status ServerMetadata(grpc::ServerContext* context,
                              const inference::ServerMetadataRequest* request,
                              inference::ServerMetadataResponse* response) override;
  grpc::Status ModelMetadata(grpc::ServerContext* context,
                             const inference::ModelMetadataRequest* request,
                             inference::ModelMetadataResponse* response) override;
  grpc::Status ModelInfer(grpc::ServerContext* context, const inference::ModelInferRequest* request,
                          inference::ModelInferResponse* response) override;
  grpc::Status ModelStreamInfer(
      grpc::ServerContext* context,
      grpc::ServerReaderWriter<inference::ModelStreamInferResponse, inference::ModelInferRequest>*
          stream) override;

 private:
  bool Ready() const;
  std::atomic<engine::Engine*> engine_{nullptr};
};

}  // namespace moeserve::server
