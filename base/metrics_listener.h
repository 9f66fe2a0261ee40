// The Prometheus /metrics listener of moeserve's processes (the server and the EPLB
// controller): a prometheus-cpp exposer bound to the address its flags name.
//
// prometheus-cpp reports a port in use by throwing; StartMetricsListener turns that into a
// status with a message, so no process aborts on it. Plain HTTP only: the civetweb that
// prometheus-cpp embeds on Debian 12 loads OpenSSL 1.1 functions by name and calls a null
// pointer under OpenSSL 3 on the first HTTPS connection, so /metrics binds a private address
// (loopback, the pod network) instead. The exposer is thread-safe.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "prometheus/exposer.h"

namespace moeserve::base {

// UNAVAILABLE naming the address when it cannot be bound. Port 0 picks a free port (BoundPort).
absl::StatusOr<std::unique_ptr<prometheus::Exposer>> StartMetricsListener(const std::string& host,
                                                                          int port);

// The port the exposer listens on (useful after port 0).
int BoundPort(const prometheus::Exposer& exposer);

}  // namespace moeserve::base
