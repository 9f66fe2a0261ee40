// The `moeserve serve` process, and the cluster front end (`moeserve frontend`): starts the
// gRPC server (Generation, the KServe v2 inference service, health, reflection, and Admin with a
// token), the OpenAI-compatible HTTP server and the Prometheus exposer, makes the engine — by
// loading the model (serve), or over the groups' rank processes (frontend) — and shuts down
// gracefully on SIGTERM/SIGINT.
// Called once from main(); blocks until shutdown.
#pragma once

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/engine.h"
#include "server/chat_template.h"
#include "server/generation_service.h"

namespace prometheus {
class Registry;
}

namespace moeserve::server {

// An engine made by someone other than RunServe, with the model's chat template when that
// comes with it.
struct ServedEngine {
  std::unique_ptr<engine::Engine> engine;
  std::optional<ChatTemplateSource> chat_template;
};

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
  // The cluster front end: makes the engine (once the ports listen) instead of loading
  // `engine`; `groups` then names its groups, entry group first.
  std::function<absl::StatusOr<ServedEngine>(prometheus::Registry*)> create_engine;
  std::vector<std::string> groups;
};

// Returns the process exit code.
int RunServe(const ServeOptions& options);

}  // namespace moeserve::server
