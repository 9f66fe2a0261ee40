// The `moeserve serve` process: loads the model, starts the gRPC server (Generation, the KServe
// v2 inference service, health, reflection), the OpenAI-compatible HTTP server and the
// Prometheus exposer, and shuts down gracefully on SIGTERM/SIGINT.
// Called once from main(); blocks until shutdown.
#pragma once

#include <string>

#include "engine/engine.h"
#include "server/generation_service.h"

namespace moeserve::server {

struct ServeOptions {
  std::string host = "127.0.0.1";
  int port = 50051;         // 0 picks a free port (printed on the ready line)
  int metrics_port = 9400;  // 0 picks a free port; -1 disables the exporter
  int http_port = 8000;     // OpenAI-compatible HTTP; 0 picks a free port; -1 turns it off
  int http_max_connections = 256;
  std::string chat_template_file;  // empty: the model's own template
  double shutdown_grace_seconds = 10.0;
  int max_receive_message_bytes = 16 << 20;
  std::string admin_token_file;  // empty: the Admin service is not served
  engine::EngineOptions engine;  // the model and device are engine.model and engine.device
};

// Returns the process exit code.
int RunServe(const ServeOptions& options);

}  // namespace moeserve::server
