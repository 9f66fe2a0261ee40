// Unparseable requests answer INVALID_ARGUMENT with a message.
//
// When gRPC cannot parse a request (a truncated protobuf, invalid UTF-8 in a string field) its
// generated handlers answer INTERNAL with an empty message before any service code runs, which
// reads as a server bug. This server interceptor sees that the request message never arrived
// parsed and rewrites the status the handler sends into INVALID_ARGUMENT saying what is wrong.
// Registered once on the ServerBuilder; gRPC creates one interceptor per call.
#pragma once

#include <memory>
#include <vector>

#include "grpcpp/support/server_interceptor.h"

namespace moeserve::server {

// The interceptor factories every moeserve gRPC server installs.
std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>>
RequestParseErrorInterceptors();

}  // namespace moeserve::server
