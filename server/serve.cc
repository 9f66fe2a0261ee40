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

std::vector<std::string> GroupNames(const ServeOptions& options) {
  if (!options.groups.empty()) return options.groups;
  if (options.engine.parallel.prefill_ep > 0) return {"prefill", "decode"};
  return {"mixed"};
}

// The OpenAI door's chat template from its source: null with a reason when templates cannot be
// rendered here (no Python runtime: chats answer 503, everything else serves), or with a note
// when there is none; an error for a template that does not compile.
struct CompiledChatTemplate {
  std::unique_ptr<ChatTemplate> compiled;
  std::string unavailable;
};
absl::StatusOr<CompiledChatTemplate> CompileChatTemplate(std::optional<ChatTemplateSource> source) {
  CompiledChatTemplate result;
  if (!source.has_value()) {
    std::cerr << "moeserve: the model has no chat template; /v1/chat/completions answers 400 "
                 "(give one with --chat-template FILE)\n";
    return result;
  }
  absl::StatusOr<std::unique_ptr<ChatTemplate>> compiled =
      ChatTemplate::Compile(std::move(*source));
  if (compiled.status().code() == absl::StatusCode::kFailedPrecondition) {
    result.unavailable = std::string(compiled.status().message());
    std::cerr << "moeserve: " << result.unavailable
              << "; /v1/chat/completions answers 503, everything else serves\n";
    return result;
  }
  if (!compiled.ok()) return compiled.status();
  result.compiled = std::move(*compiled);
  return result;
}

std::string LayoutText(const engine::LayoutInfo& layout) {
  const std::string groups = layout.prefill_ep > 0 ? absl::StrCat("prefill EP", layout.prefill_ep,
                                                                  " + decode EP", layout.decode_ep)
                                                   : absl::StrCat("EP", layout.decode_ep);
  return absl::StrCat(groups, ", ", layout.num_redundant_experts,
                      " redundant experts, two-batch overlap ",
                      layout.two_batch_overlap ? "on" : "off", ", ", layout.device);
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

  // The OpenAI front door listens from the start, answering 503 until the model is loaded. Its
  // chat template is checked before the model loads; a front end without --chat-template uses
  // the one its ranks report, once it reaches them.
  std::unique_ptr<OpenAiHttpServer> http;
  std::string http_address = "off";
  const bool template_from_engine =
      options.create_engine != nullptr && options.chat_template_file.empty();
  if (options.http_port >= 0) {
    CompiledChatTemplate chat_template;
    if (!template_from_engine) {
      absl::StatusOr<std::optional<ChatTemplateSource>> source =
          LoadChatTemplateSource(options.engine.model, options.chat_template_file);
      if (!source.ok()) {
        std::cerr << "moeserve: chat template: " << source.status().message() << "\n";
        return 1;
      }
      absl::StatusOr<CompiledChatTemplate> compiled = CompileChatTemplate(std::move(*source));
      if (!compiled.ok()) {
        std::cerr << "moeserve: " << compiled.status().message() << "\n";
        return 1;
      }
      chat_template = std::move(*compiled);
    }
    http = std::make_unique<OpenAiHttpServer>(
        OpenAiHttpOptions{.host = options.host,
                          .port = options.http_port,
                          .max_connections = options.http_max_connections,
                          .chat_unavailable = chat_template.unavailable},
        std::move(chat_template.compiled));
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
  for (const std::string& group : GroupNames(options)) SetGroupHealth(*health, group, false);

  absl::StatusOr<ServedEngine> served = [&]() -> absl::StatusOr<ServedEngine> {
    if (options.create_engine != nullptr) return options.create_engine(registry.get());
    absl::StatusOr<std::unique_ptr<engine::Engine>> local =
        engine::Engine::Create(options.engine, registry.get());
    if (!local.ok()) return local.status();
    return ServedEngine{std::move(*local), std::nullopt};
  }();
  if (!served.ok()) {
    std::cerr << "moeserve: " << served.status().message() << "\n";
    server->Shutdown();
    if (http != nullptr) http->Stop();
    return 1;
  }
  std::unique_ptr<engine::Engine>* engine = &served->engine;
  if (http != nullptr && template_from_engine) {
    absl::StatusOr<CompiledChatTemplate> compiled =
        CompileChatTemplate(std::move(served->chat_template));
    if (!compiled.ok()) {
      // The groups serve a template this front end cannot compile: chats say why.
      std::cerr << "moeserve: the ranks' chat template: " << compiled.status().message() << "\n";
      http->SetChatTemplate(nullptr, absl::StrCat("the model's chat template does not compile: ",
                                                  compiled.status().message()));
    } else {
      http->SetChatTemplate(std::move(compiled->compiled), compiled->unavailable);
    }
  }
  generation.AttachEngine(engine->get());
  kserve.AttachEngine(engine->get());
  if (http != nullptr) http->AttachEngine(engine->get());
  if (admin != nullptr) admin->AttachEngine(engine->get());
  // A failed group stops serving (in one process it can only recover by a restart, so the
  // liveness probe on "" restarts the process; a front end's group serves again once its rank
  // processes re-formed it); the server serves while every group does.
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
  const engine::LayoutInfo& layout = (*engine)->layout();
  const std::string model =
      options.create_engine != nullptr ? (*engine)->model_info().name : options.engine.model;
  std::cout << "moeserve: serving " << model << " on " << options.host << ":" << selected_port
            << " (metrics on " << metrics_address << ", OpenAI HTTP on " << http_address << ", "
            << LayoutText(layout) << ", KV cache " << stats.kv_blocks_total << " blocks of "
            << layout.kv_block_size << " tokens)" << std::endl;

  int signal_number = 0;
  sigwait(&shutdown_signals, &signal_number);
  std::cout << "moeserve: received " << (signal_number == SIGTERM ? "SIGTERM" : "SIGINT")
            << ", draining in-flight requests (grace " << options.shutdown_grace_seconds << " s)"
            << std::endl;
  SetServerHealth(*health, false);
  for (const std::string& group : GroupNames(options)) SetGroupHealth(*health, group, false);
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
