// The conversion of a Generate request (protobuf) into the engine's input, with no validation
// beyond what the types force: the engine validates (engine/runtime/request_validation.h).
// Protobuf only, no gRPC, so the request fuzzer links it alone. Pure; thread-safe.
#pragma once

#include "engine/api/request.h"
#include "moeserve/v1/generation.pb.h"

namespace moeserve::server {

engine::GenerationInput ToGenerationInput(const moeserve::v1::GenerateRequest& request);

}  // namespace moeserve::server
