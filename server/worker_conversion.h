// Engine types ↔ the internal worker API (proto/moeserve/v1/worker.proto) between the cluster
// front end and the rank processes: generation inputs and outputs, sequence handoffs and model
// info. Field for field; the engine validates what it receives. Stateless; thread-safe.
#pragma once

#include "engine/api/handoff.h"
#include "engine/api/request.h"
#include "engine/engine.h"
#include "moeserve/v1/worker.pb.h"
#include "server/chat_template.h"

namespace moeserve::server {

moeserve::v1::WorkerGenerateRequest ToWorkerRequest(const engine::GenerationInput& input);
engine::GenerationInput FromWorkerRequest(const moeserve::v1::WorkerGenerateRequest& request);

moeserve::v1::WorkerGenerateResponse ToWorkerResponse(const engine::GenerationOutput& output);
engine::GenerationOutput FromWorkerResponse(const moeserve::v1::WorkerGenerateResponse& response);

moeserve::v1::HandoffMessage ToHandoffMessage(const engine::SequenceHandoff& handoff);
engine::SequenceHandoff FromHandoffMessage(const moeserve::v1::HandoffMessage& message);

void ToModelInfoProto(const engine::ModelInfo& info, moeserve::v1::ModelInfo* out);
engine::ModelInfo FromModelInfoProto(const moeserve::v1::ModelInfo& info);

void ToChatTemplateProto(const std::optional<ChatTemplateSource>& source,
                         moeserve::v1::ChatTemplateInfo* out);
// INVALID_ARGUMENT when its special tokens are not a JSON object.
absl::StatusOr<std::optional<ChatTemplateSource>> FromChatTemplateProto(
    const moeserve::v1::ChatTemplateInfo& info);

moeserve::v1::FinishReason ToFinishReasonProto(engine::FinishReason reason);

}  // namespace moeserve::server
