// The `moeserve serve` process, and the cluster front end (`moeserve frontend`): starts the
// gRPC server (Generation, the KServe v2 inference service, health, reflection, and Admin on the
// same port or its own), the OpenAI-compatible HTTP server and the Prometheus exposer, makes the
// engine — by loading the model (serve), or over the groups' rank processes (frontend) — and
// stops on signals.
//
// Listeners: every one binds the address its flag names and refuses a port another process holds
// (SO_REUSEPORT is off, so two servers never split one port's connections). The gRPC and Admin
// ports speak TLS when given a certificate and key (optionally requiring client certificates);
// /metrics and the OpenAI HTTP port are plain HTTP (base/metrics_listener.h says why for
// /metrics).
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

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "base/tls_files.h"
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
  int port = 50051;          // 0 picks a free port (printed on the ready line)
  base::TlsServerFiles tls;  // the gRPC port; disabled: plaintext
  std::string metrics_host;  // empty: `host`
  int metrics_port = 9400;   // 0 picks a free port; -1 disables the exporter (HTTP)
  std::string http_host;     // empty: `host`
  int http_port = 8000;      // OpenAI-compatible HTTP; 0 picks a free port; -1 turns it off
  int http_max_connections = 256;
  std::string chat_template_file;  // empty: the model's own template
  double shutdown_grace_seconds = 10.0;
  // Health `liveness` turns NOT_SERVING when a rank loop stalls this long (see process_health.h).
  double liveness_stall_seconds = 120;
  int max_receive_message_bytes = 16 << 20;
  // The Admin API is served when a token file or an admin client CA is given: on the gRPC port
  // (admin_port -1, token required) or on its own port, which requires TLS (admin_tls, or `tls`
  // when admin_tls has no certificate) and authenticates by the token, by client certificates
  // (admin_tls.client_ca), or both.
  std::string admin_token_file;
  std::string admin_host;  // empty: `host`
  int admin_port = -1;     // -1: on the gRPC port; 0: a free port
  base::TlsServerFiles admin_tls;
  // Test hook: waits this long before loading the model (tests of signals during loading).
  double inject_load_delay_seconds = 0;
  engine::EngineOptions engine;  // the model and device are engine.model and engine.device
  // The cluster front end: makes the engine (once the ports listen) instead of loading
  // `engine`; `groups` then names its groups, entry group first.
  std::function<absl::StatusOr<ServedEngine>(prometheus::Registry*)> create_engine;
  std::vector<std::string> groups;
};

// Returns the process exit code.
int RunServe(const ServeOptions& options);

}  // namespace moeserve::server
