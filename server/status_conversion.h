// absl::Status → grpc::Status. The only place server code maps engine errors onto gRPC codes.
// Stateless; thread-safe.
#pragma once

#include "absl/status/status.h"
#include "grpcpp/support/status.h"

namespace moeserve::server {

grpc::Status ToGrpcStatus(const absl::Status& status);

}  // namespace moeserve::server
