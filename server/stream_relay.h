// RelayStream: the loop every streaming gRPC handler runs over an engine request stream — one
// message per output until the last, with the stream's end mapped to a gRPC status (its error;
// CANCELLED for a cancelled request; UNAVAILABLE for one the engine ended because it stopped),
// and the request cancelled (its KV blocks freed) when the peer gives up or goes away.
//
// Called on the gRPC handler's thread; `stream` belongs to that call.
#pragma once

#include <chrono>
#include <optional>
#include <string>

#include "engine/api/request.h"
#include "grpcpp/server_context.h"
#include "grpcpp/support/sync_stream.h"
#include "server/status_conversion.h"

namespace moeserve::server {

// `to_response` turns an engine::GenerationOutput into a Response; `who_stopped` names what
// stopped in the UNAVAILABLE message ("the server", "the rank"); `peer` names who went away.
template <typename Response, typename ToResponse>
grpc::Status RelayStream(grpc::ServerContext* context, engine::RequestStream& stream,
                         grpc::ServerWriter<Response>* writer, const ToResponse& to_response,
                         const std::string& who_stopped, const std::string& peer) {
  // How often a stream with nothing new checks whether its caller gave up.
  constexpr auto kPollInterval = std::chrono::milliseconds(20);
  while (true) {
    std::optional<engine::GenerationOutput> output = stream.Next(kPollInterval);
    if (!output.has_value()) {
      if (context->IsCancelled()) {
        stream.Cancel();  // a cancel or a deadline: stop the work and free its KV blocks
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
                          who_stopped + " stopped before the request finished");
    }
    if (!writer->Write(to_response(*output))) {
      stream.Cancel();
      return grpc::Status(grpc::StatusCode::CANCELLED, peer + " went away");
    }
    if (output->is_last()) return grpc::Status::OK;
  }
}

}  // namespace moeserve::server
