#include "server/generation_service.h"

#include <chrono>

#include "server/request_conversion.h"
#include "server/status_conversion.h"
#include "server/stream_relay.h"
#include "server/worker_conversion.h"

namespace moeserve::server {
namespace {

grpc::Status Unavailable() {
  return grpc::Status(grpc::StatusCode::UNAVAILABLE, "the model is still loading; retry shortly");
}

}  // namespace

grpc::Status GenerationService::Generate(
    grpc::ServerContext* context, const moeserve::v1::GenerateRequest* request,
    grpc::ServerWriter<moeserve::v1::GenerateResponse>* writer) {
  engine::Engine* engine = engine_.load();
  if (engine == nullptr) return Unavailable();
  absl::StatusOr<std::shared_ptr<engine::RequestStream>> stream =
      engine->Submit(ToGenerationInput(*request));
  if (!stream.ok()) return ToGrpcStatus(stream.status());
  const std::string request_id = (*stream)->request_id();
  return RelayStream(
      context, **stream, writer,
      [&request_id](engine::GenerationOutput& output) {
        moeserve::v1::GenerateResponse response;
        response.set_request_id(request_id);
        for (int32_t id : output.token_ids) response.add_token_ids(static_cast<uint32_t>(id));
        response.set_text(std::move(output.text));
        if (output.is_last()) {
          response.set_finish_reason(ToFinishReasonProto(output.finish_reason));
          auto* usage = response.mutable_usage();
          usage->set_prompt_tokens(output.usage.prompt_tokens);
          usage->set_completion_tokens(output.usage.completion_tokens);
          usage->set_time_to_first_token_seconds(output.usage.time_to_first_token_seconds);
          usage->set_total_seconds(output.usage.total_seconds);
          usage->set_queue_seconds(output.usage.queue_seconds);
        }
        return response;
      },
      "the server", "the client");
}

grpc::Status GenerationService::GetModelInfo(grpc::ServerContext*,
                                             const moeserve::v1::GetModelInfoRequest*,
                                             moeserve::v1::ModelInfo* info) {
  engine::Engine* engine = engine_.load();
  if (engine == nullptr) return Unavailable();
  ToModelInfoProto(engine->model_info(), info);
  const engine::LayoutInfo& l = engine->layout();
  auto* layout = info->mutable_layout();
  layout->set_prefill_ep(l.prefill_ep);
  layout->set_decode_ep(l.decode_ep);
  layout->set_num_redundant_experts(l.num_redundant_experts);
  layout->set_two_batch_overlap(l.two_batch_overlap);
  layout->set_device(l.device);
  return grpc::Status::OK;
}

}  // namespace moeserve::server
