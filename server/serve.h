// The `moeserve serve` process: loads the model, starts the gRPC server (Generation, health,
// reflection, Admin), the Prometheus exposer, and stops on signals.
//
// Listeners: every one binds the address its flag names and refuses a port another process holds
// (SO_REUSEPORT is off, so two servers never split one port's connections).
//
// Signals (server/shutdown_signals.h): SIGTERM, SIGINT or SIGHUP while the model loads stop the
// process before it serves (exit 0). Once serving, the first one drains: health turns
// NOT_SERVING, new requests get UNAVAILABLE, in-flight streams run on for up to the grace period,
// then those left end with UNAVAILABLE (exit 0). A second one during the drain stops at once:
// the streams left end with UNAVAILABLE and the process exits 1. SIGUSR1/SIGUSR2 are logged and
// ignored.
//
// Called once from main(); blocks until shutdown.
#pragma once

#include <string>

#include "engine/engine.h"
#include "server/generation_service.h"

namespace moeserve::server {

struct ServeOptions {
  std::string host = "127.0.0.1";
  int port = 50051;          // 0 picks a free port (printed on the ready line)
  std::string metrics_host;  // empty: `host`
  int metrics_port = 9400;   // 0 picks a free port; -1 disables the exporter (HTTP)
  double shutdown_grace_seconds = 10.0;
  int max_receive_message_bytes = 16 << 20;
  std::string admin_token_file;  // empty: the Admin service is not served
  // Test hook: waits this long before loading the model (tests of signals during loading).
  double inject_load_delay_seconds = 0;
  engine::EngineOptions engine;  // the model and device are engine.model and engine.device
};

// Returns the process exit code.
int RunServe(const ServeOptions& options);

}  // namespace moeserve::server
