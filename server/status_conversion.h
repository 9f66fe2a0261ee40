// absl::Status ↔ grpc::Status. The only place server code maps engine errors onto gRPC codes
// (and, in the cluster front end, a rank's gRPC errors back).
// Stateless; thread-safe.
#pragma once

#include "absl/status/status.h"
#include "grpcpp/support/status.h"

namespace moeserve::server {

grpc::Status ToGrpcStatus(const absl::Status& status);
absl::Status FromGrpcStatus(const grpc::Status& status);

}  // namespace moeserve::server
