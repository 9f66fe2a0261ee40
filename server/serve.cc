#include "server/serve.h"

#include <signal.h>

#include <chrono>
#include <cstdio>
#include <iostream>
#include <memory>
#include <thread>

#include "absl/strings/str_cat.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/health_check_service_interface.h"
#include "grpcpp/server.h"
#include "grpcpp/server_builder.h"
#include "prometheus/exposer.h"
#include "prometheus/registry.h"
#include "server/admin_service.h"
#include "server/chat_template.h"
#include "server/kserve_service.h"
#include "server/openai_http_server.h"

namespace moeserve::server {
namespace {

// The health service's names: "" and kGenerationService speak for the whole server (SERVING
// once the model is loaded and while every group serves); "<kGenerationService>/<group>"
// speaks for one expert-parallel group.
constexpr char kGenerationService[] = "moeserve.v1.Generation";

std::vector<std::string> GroupNames(const engine::ParallelOptions& parallel) {
  if (parallel.prefill_ep > 0) return {"prefill", "decode"};
  return {"mixed"};
}

void SetServerHealth(grpc::HealthCheckServiceInterface& health, bool serving) {
  health.SetServingStatus("", serving);
  health.SetServingStatus(kGenerationService, serving);
}

void SetGroupHealth(grpc::HealthCheckServiceInterface& health, const std::string& group,
                    bool serving) {
  health.SetServingStatus(absl::StrCat(kGenerationService, "/", group), serving);
}

}  // namespace

int RunServe(const ServeOptions& options) {
  // Block the shutdown signals in every thread; the main thread waits for them with sigwait.
  sigset_t shutdown_signals;
  sigemptyset(&shutdown_signals);
  sigaddset(&shutdown_signals, SIGTERM);
  sigaddset(&shutdown_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &shutdown_signals, nullptr);
  // A client that closes its connection mid-response must cost an error return, not the process.
  signal(SIGPIPE, SIG_IGN);

  auto registry = std::make_shared<prometheus::Registry>();
  std::unique_ptr<prometheus::Exposer> exposer;
  std::string metrics_address = "disabled";
  if (options.metrics_port >= 0) {
    try {
      exposer = std::make_unique<prometheus::Exposer>(
          absl::StrCat(options.host, ":", options.metrics_port));
    } catch (const std::exception& e) {
      std::cerr << "moeserve: cannot serve metrics on " << options.host << ":"
                << options.metrics_port << ": " << e.what() << "\n";
      return 1;
    }
    exposer->RegisterCollectable(registry);
    const auto ports = exposer->GetListeningPorts();
    metrics_address = absl::StrCat(options.host, ":", ports.empty() ? 0 : ports.front());
  }

  // The OpenAI front door listens from the start, answering 503 until the model is loaded.
  std::unique_ptr<OpenAiHttpServer> http;
  std::string http_address = "off";
  if (options.http_port >= 0) {
    absl::StatusOr<std::optional<ChatTemplateSource>> source =
        LoadChatTemplateSource(options.engine.model, options.chat_template_file);
    if (!source.ok()) {
      std::cerr << "moeserve: chat template: " << source.status().message() << "\n";
      return 1;
    }
    std::unique_ptr<ChatTemplate> chat_template;
    std::string chat_unavailable;
    if (source->has_value()) {
      absl::StatusOr<std::unique_ptr<ChatTemplate>> compiled =
          ChatTemplate::Compile(std::move(**source));
      if (compiled.status().code() == absl::StatusCode::kFailedPrecondition) {
        // No Python runtime for templates here: everything but chat completions still serves.
        chat_unavailable = std::string(compiled.status().message());
        std::cerr << "moeserve: " << chat_unavailable
                  << "; /v1/chat/completions answers 503, everything else serves\n";
      } else if (!compiled.ok()) {
        std::cerr << "moeserve: " << compiled.status().message() << "\n";
        return 1;
      } else {
        chat_template = std::move(*compiled);
      }
    } else {
      std::cerr << "moeserve: the model has no chat template; /v1/chat/completions answers 400 "
                   "(give one with --chat-template FILE)\n";
    }
    http = std::make_unique<OpenAiHttpServer>(
        OpenAiHttpOptions{.host = options.host,
                          .port = options.http_port,
                          .max_connections = options.http_max_connections,
                          .chat_unavailable = chat_unavailable},
        std::move(chat_template));
    absl::StatusOr<int> http_port = http->Start();
    if (!http_port.ok()) {
      std::cerr << "moeserve: " << http_port.status().message() << "\n";
      return 1;
    }
    http_address = absl::StrCat(options.host, ":", *http_port);
  }

  GenerationService generation;
  KServeService kserve;
  std::unique_ptr<AdminService> admin;
  if (!options.admin_token_file.empty()) {
    absl::StatusOr<std::string> token = ReadAdminToken(options.admin_token_file);
    if (!token.ok()) {
      std::cerr << "moeserve: " << token.status().message() << "\n";
      return 1;
    }
    admin = std::make_unique<AdminService>(std::move(*token));
  }
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int selected_port = 0;
  builder.AddListeningPort(absl::StrCat(options.host, ":", options.port),
                           grpc::InsecureServerCredentials(), &selected_port);
  builder.SetMaxReceiveMessageSize(options.max_receive_message_bytes);
  builder.RegisterService(&generation);
  builder.RegisterService(&kserve);
  if (admin != nullptr) builder.RegisterService(admin.get());
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || selected_port == 0) {
    std::cerr << "moeserve: cannot listen on " << options.host << ":" << options.port
              << " (address in use or not available)\n";
    return 1;
  }
  grpc::HealthCheckServiceInterface* health = server->GetHealthCheckService();
  // NOT_SERVING until the model is loaded.
  SetServerHealth(*health, false);
  for (const std::string& group : GroupNames(options.engine.parallel)) {
    SetGroupHealth(*health, group, false);
  }

  absl::StatusOr<std::unique_ptr<engine::Engine>> engine =
      engine::Engine::Create(options.engine, registry.get());
  if (!engine.ok()) {
    std::cerr << "moeserve: " << engine.status().message() << "\n";
    server->Shutdown();
    if (http != nullptr) http->Stop();
    return 1;
  }
  generation.AttachEngine(engine->get());
  kserve.AttachEngine(engine->get());
  if (http != nullptr) http->AttachEngine(engine->get());
  if (admin != nullptr) admin->AttachEngine(engine->get());
  // A failed group can only recover by a restart: the server as a whole stops serving (so a
  // liveness probe on "" restarts the process) and so does the group's own name.
  // A failed group stops serving (in one process it can only recover by a restart, so the
  // liveness probe on "" restarts the process); the server serves while every group does.
  engine::Engine* serving_engine = engine->get();
  auto publish_health = [health, serving_engine] {
    bool all_healthy = true;
    for (const engine::GroupHealth& group : serving_engine->Health()) {
      SetGroupHealth(*health, group.group, group.status.ok());
      all_healthy = all_healthy && group.status.ok();
    }
    SetServerHealth(*health, all_healthy);
  };
  (*engine)->SetHealthListener([publish_health](const engine::GroupHealth&) { publish_health(); });
  publish_health();
  const engine::EngineStats stats = (*engine)->Stats();
  const engine::ParallelOptions& parallel = options.engine.parallel;
  const std::string layout =
      parallel.prefill_ep > 0
          ? absl::StrCat("prefill EP", parallel.prefill_ep, " + decode EP", parallel.decode_ep)
          : absl::StrCat("EP", parallel.decode_ep);
  std::cout << "moeserve: serving " << options.engine.model << " on " << options.host << ":"
            << selected_port << " (metrics on " << metrics_address << ", OpenAI HTTP on "
            << http_address << ", " << layout << ", " << parallel.num_redundant_experts
            << " redundant experts, two-batch overlap "
            << (parallel.two_batch_overlap ? "on" : "off") << ", KV cache " << stats.kv_blocks_total
            << " blocks of " << options.engine.kv_block_size << " tokens)" << std::endl;

  int signal_number = 0;
  sigwait(&shutdown_signals, &signal_number);
  std::cout << "moeserve: received " << (signal_number == SIGTERM ? "SIGTERM" : "SIGINT")
            << ", draining in-flight requests (grace " << options.shutdown_grace_seconds << " s)"
            << std::endl;
  SetServerHealth(*health, false);
  for (const std::string& group : GroupNames(options.engine.parallel)) {
    SetGroupHealth(*health, group, false);
  }
  (*engine)->StopAccepting();
  // Shutdown waits for in-flight streams until the deadline, then cancels what is left.
  const auto deadline =
      std::chrono::system_clock::now() +
      std::chrono::milliseconds(static_cast<int64_t>(options.shutdown_grace_seconds * 1000));
  server->Shutdown(deadline);
  if (http != nullptr) http->Drain(deadline);
  server->Wait();
  if (http != nullptr) http->Stop();
  admin.reset();
  (*engine)->Shutdown();
  std::cout << "moeserve: stopped" << std::endl;
  return 0;
}

}  // namespace moeserve::server
