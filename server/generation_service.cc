#include "server/generation_service.h"

#include <chrono>

#include "server/request_conversion.h"
#include "server/status_conversion.h"
#include "server/worker_conversion.h"

namespace moeserve::server {
namespace {

constexpr auto kPollInterval = std::chrono::milliseconds(20);

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
  while (true) {
    std::optional<engine::GenerationOutput> output = (*stream)->Next(kPollInterval);
    if (!output.has_value()) {
      if (context->IsCancelled()) {
        // Client cancellation or deadline: stop the work and free its KV blocks.
        (*stream)->Cancel();
        return grpc::Status(grpc::StatusCode::CANCELLED, "the request was cancelled");
      }
      continue;
    }
    if (!output->status.ok()) return ToGrpcStatus(output->status);
    if (output->finish_reason == engine::FinishReason::kCancelled) {
      return grpc::Status(grpc::StatusCode::CANCELLED, "the request was cancelled");
    }
    if (output->finish_reason == engine::FinishReason::kAborted) {
      return grpc::Status(grpc::StatusCode::UNAVAILABLE,
                          "the server stopped before the request finished");
    }
    moeserve::v1::GenerateResponse response;
    response.set_request_id((*stream)->request_id());
    for (int32_t id : output->token_ids) response.add_token_ids(static_cast<uint32_t>(id));
    response.set_text(std::move(output->text));
    if (output->is_last()) {
      response.set_finish_reason(ToFinishReasonProto(output->finish_reason));
      auto* usage = response.mutable_usage();
      usage->set_prompt_tokens(output->usage.prompt_tokens);
      usage->set_completion_tokens(output->usage.completion_tokens);
      usage->set_time_to_first_token_seconds(output->usage.time_to_first_token_seconds);
      usage->set_total_seconds(output->usage.total_seconds);
      usage->set_queue_seconds(output->usage.queue_seconds);
    }
    if (!writer->Write(response)) {
      (*stream)->Cancel();
      return grpc::Status(grpc::StatusCode::CANCELLED, "the client went away");
    }
    if (output->is_last()) return grpc::Status::OK;
  }
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
