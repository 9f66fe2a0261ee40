#include "server/serve.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <memory>
#include <optional>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/build_info.h"
#include "base/load_progress.h"
#include "base/metrics_listener.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/health_check_service_interface.h"
#include "grpcpp/server.h"
#include "grpcpp/server_builder.h"
#include "prometheus/registry.h"
#include "server/admin_service.h"
#include "server/admin_token.h"
#include "server/chat_template.h"
#include "server/kserve_service.h"
#include "server/openai_http_server.h"
#include "server/process_health.h"
#include "server/request_parse_errors.h"
#include "server/shutdown_signals.h"
#include "spdlog/spdlog.h"

namespace moeserve::server {
namespace {

using std::chrono::milliseconds;

// Exit codes (documented in the README and `serve --help`).
constexpr int kExitStopped = 0;        // drained, or stopped before serving
constexpr int kExitStartFailed = 1;    // a listener, a file or the model failed
constexpr int kExitStoppedAtOnce = 1;  // a second signal cut the drain short

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
    spdlog::warn(
        "moeserve: the model has no chat template; /v1/chat/completions answers 400 (give one "
        "with --chat-template FILE)");
    return result;
  }
  absl::StatusOr<std::unique_ptr<ChatTemplate>> compiled =
      ChatTemplate::Compile(std::move(*source));
  if (compiled.status().code() == absl::StatusCode::kFailedPrecondition) {
    result.unavailable = std::string(compiled.status().message());
    spdlog::warn("moeserve: {}; /v1/chat/completions answers 503, everything else serves",
                 result.unavailable);
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

int Fail(absl::string_view message) {
  spdlog::error("moeserve: {}", std::string(message));
  return kExitStartFailed;
}

// Settings every gRPC listener of the server shares.
void ConfigureBuilder(grpc::ServerBuilder& builder, const ServeOptions& options) {
  // gRPC sets SO_REUSEPORT by default, which lets a second server bind the same port and take
  // half its new connections; with it off, the second server fails to start instead.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  builder.SetMaxReceiveMessageSize(options.max_receive_message_bytes);
  builder.experimental().SetInterceptorCreators(RequestParseErrorInterceptors());
}

// The Admin API's listener settings, checked before anything starts.
struct AdminPlan {
  bool enabled = false;
  bool own_port = false;
  std::string host;
  base::TlsServerFiles tls;
  std::optional<std::string> token;  // none: client certificates alone authenticate
};

absl::StatusOr<AdminPlan> PlanAdmin(const ServeOptions& options) {
  AdminPlan plan;
  plan.enabled = !options.admin_token_file.empty() || !options.admin_tls.client_ca.empty();
  plan.own_port = options.admin_port >= 0;
  if (!plan.enabled) {
    if (plan.own_port) {
      return absl::InvalidArgumentError(
          "--admin-port needs the Admin API on: give --admin-token-file or --admin-tls-client-ca");
    }
    return plan;
  }
  if (!options.admin_token_file.empty()) {
    absl::StatusOr<std::string> token = ReadAdminToken(options.admin_token_file);
    if (!token.ok()) return token.status();
    plan.token = *std::move(token);
  }
  if (!plan.own_port) {
    if (options.admin_tls.enabled()) {
      return absl::InvalidArgumentError(
          "--admin-tls-* configure the Admin API's own port: add --admin-port");
    }
    return plan;
  }
  plan.host = options.admin_host.empty() ? options.host : options.admin_host;
  plan.tls = options.admin_tls;
  if (plan.tls.cert.empty() && plan.tls.key.empty()) {
    plan.tls.cert = options.tls.cert;
    plan.tls.key = options.tls.key;
  }
  if (plan.tls.cert.empty() || plan.tls.key.empty()) {
    return absl::InvalidArgumentError(
        "the Admin API's own port speaks TLS only: give --admin-tls-cert and --admin-tls-key (or "
        "--tls-cert and --tls-key)");
  }
  return plan;
}

// Waits for `loading` while watching for stop signals. A stop signal ends the process before it
// serves; the model load is not interruptible, and nothing is in flight yet.
void WaitForLoad(const std::atomic<bool>& loaded, grpc::Server& server) {
  while (!loaded.load()) {
    const int signal_number = ShutdownSignals::Next(milliseconds(100));
    if (signal_number == 0) continue;
    spdlog::info("moeserve: received {} while loading the model; stopping before serving",
                 ShutdownSignals::Name(signal_number));
    server.Shutdown(std::chrono::system_clock::now());
    std::fflush(nullptr);
    // The loader thread is inside the model load; leave without waiting for it.
    std::_Exit(kExitStopped);
  }
}

}  // namespace

int RunServe(const ServeOptions& options) {
  if (absl::Status status = ShutdownSignals::Install(); !status.ok()) {
    return Fail(status.message());
  }

  auto registry = std::make_shared<prometheus::Registry>();
  const std::shared_ptr<prometheus::Collectable> load_progress =
      base::LoadProgress::NewCollectable();
  base::RegisterBuildInfo(*registry, options.create_engine != nullptr ? "frontend" : "server");
  std::unique_ptr<base::MetricsListener> metrics;
  std::string metrics_address = "disabled";
  if (options.metrics_port >= 0) {
    const std::string host = options.metrics_host.empty() ? options.host : options.metrics_host;
    absl::StatusOr<std::unique_ptr<base::MetricsListener>> started =
        base::MetricsListener::Start(host, options.metrics_port);
    if (!started.ok()) return Fail(started.status().message());
    metrics = *std::move(started);
    metrics->RegisterCollectable(registry);
    metrics->RegisterCollectable(load_progress);
    metrics_address = absl::StrCat(host, ":", metrics->port());
  }

  absl::StatusOr<AdminPlan> admin_plan = PlanAdmin(options);
  if (!admin_plan.ok()) return Fail(admin_plan.status().message());
  GenerationService generation;
  KServeService kserve;
  std::unique_ptr<AdminService> admin;
  if (admin_plan->enabled) admin = std::make_unique<AdminService>(admin_plan->token);

  absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> credentials =
      base::MakeServerCredentials(options.tls);
  if (!credentials.ok()) return Fail(absl::StrCat("--tls-*: ", credentials.status().message()));
  absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> admin_credentials =
      grpc::InsecureServerCredentials();
  if (admin_plan->own_port) {
    admin_credentials = base::MakeServerCredentials(admin_plan->tls);
    if (!admin_credentials.ok()) {
      return Fail(absl::StrCat("--admin-tls-*: ", admin_credentials.status().message()));
    }
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
      if (!source.ok()) return Fail(absl::StrCat("chat template: ", source.status().message()));
      absl::StatusOr<CompiledChatTemplate> compiled = CompileChatTemplate(std::move(*source));
      if (!compiled.ok()) return Fail(compiled.status().message());
      chat_template = std::move(*compiled);
    }
    const std::string host = options.http_host.empty() ? options.host : options.http_host;
    http = std::make_unique<OpenAiHttpServer>(
        OpenAiHttpOptions{.host = host,
                          .port = options.http_port,
                          .max_connections = options.http_max_connections,
                          .chat_unavailable = chat_template.unavailable},
        std::move(chat_template.compiled));
    absl::StatusOr<int> http_port = http->Start();
    if (!http_port.ok()) return Fail(http_port.status().message());
    http_address = absl::StrCat(host, ":", *http_port);
  }

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int selected_port = 0;
  builder.AddListeningPort(absl::StrCat(options.host, ":", options.port), *credentials,
                           &selected_port);
  ConfigureBuilder(builder, options);
  builder.RegisterService(&generation);
  builder.RegisterService(&kserve);
  if (admin != nullptr && !admin_plan->own_port) builder.RegisterService(admin.get());
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || selected_port == 0) {
    return Fail(absl::StrCat("cannot listen on ", options.host, ":", options.port,
                             " (address in use or not available)"));
  }

  std::unique_ptr<grpc::Server> admin_server;
  int admin_port = 0;
  if (admin != nullptr && admin_plan->own_port) {
    grpc::ServerBuilder admin_builder;
    admin_builder.AddListeningPort(absl::StrCat(admin_plan->host, ":", options.admin_port),
                                   *admin_credentials, &admin_port);
    ConfigureBuilder(admin_builder, options);
    admin_builder.RegisterService(admin.get());
    admin_server = admin_builder.BuildAndStart();
    if (admin_server == nullptr || admin_port == 0) {
      server->Shutdown();
      return Fail(absl::StrCat("cannot listen for the Admin API on ", admin_plan->host, ":",
                               options.admin_port, " (address in use or not available)"));
    }
  }

  // NOT_SERVING until the model is loaded (liveness SERVING: loading is progress).
  ProcessHealth health(*server->GetHealthCheckService(), registry.get(), GroupNames(options));

  const std::string what_loads =
      options.create_engine != nullptr
          ? absl::StrCat("the groups ", absl::StrJoin(GroupNames(options), ", "))
          : options.engine.model;
  spdlog::info(
      "moeserve: loading {} (listening on {}:{}, metrics on {}; health NOT_SERVING until loaded)",
      what_loads, options.host, selected_port, metrics_address);
  absl::StatusOr<ServedEngine> served = absl::UnavailableError("the model is loading");
  std::atomic<bool> loaded{false};
  std::thread loader([&] {
    if (options.inject_load_delay_seconds > 0) {
      std::this_thread::sleep_for(
          milliseconds(static_cast<int64_t>(options.inject_load_delay_seconds * 1000)));
    }
    if (options.create_engine != nullptr) {
      served = options.create_engine(registry.get());
    } else {
      absl::StatusOr<std::unique_ptr<engine::Engine>> local =
          engine::Engine::Create(options.engine, registry.get());
      if (local.ok()) {
        served = ServedEngine{std::move(*local), std::nullopt};
      } else {
        served = local.status();
      }
    }
    loaded = true;
  });
  WaitForLoad(loaded, *server);
  loader.join();
  if (!served.ok()) {
    server->Shutdown();
    if (admin_server != nullptr) admin_server->Shutdown();
    if (http != nullptr) http->Stop();
    return Fail(served.status().message());
  }
  base::LoadProgress::Global().Finish();
  std::unique_ptr<engine::Engine>* engine = &served->engine;
  if (http != nullptr && template_from_engine) {
    absl::StatusOr<CompiledChatTemplate> compiled =
        CompileChatTemplate(std::move(served->chat_template));
    if (!compiled.ok()) {
      // The groups serve a template this front end cannot compile: chats say why.
      spdlog::error("moeserve: the ranks' chat template: {}",
                    std::string(compiled.status().message()));
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
  // A failed group stops serving; the server serves while every group does. In one process a
  // failed group comes back only with a restart, so it also ends liveness; a front end's group
  // serves again once its rank processes re-formed it.
  engine::Engine* serving_engine = engine->get();
  (*engine)->SetHealthListener([&health, serving_engine](const engine::GroupHealth&) {
    health.PublishFrom(*serving_engine);
  });
  health.PublishFrom(*serving_engine);
  health.WatchLiveness(*serving_engine,
                       {.stall_seconds = options.liveness_stall_seconds,
                        .group_failure_is_fatal = options.create_engine == nullptr});
  const engine::EngineStats stats = (*engine)->Stats();
  const engine::LayoutInfo& layout = (*engine)->layout();
  const std::string model =
      options.create_engine != nullptr ? (*engine)->model_info().name : options.engine.model;
  std::string admin_address = admin == nullptr ? "off" : "on the gRPC port";
  if (admin_server != nullptr) admin_address = absl::StrCat(admin_plan->host, ":", admin_port);
  spdlog::info(
      "moeserve: serving {} on {}:{} (metrics on {}, OpenAI HTTP on {}, {}, KV cache {} blocks of "
      "{} tokens, TLS {}, admin {})",
      model, options.host, selected_port, metrics_address, http_address, LayoutText(layout),
      stats.kv_blocks_total, layout.kv_block_size, options.tls.enabled() ? "on" : "off",
      admin_address);

  int signal_number = 0;
  while (signal_number == 0) signal_number = ShutdownSignals::Next(milliseconds(1000));
  spdlog::info(
      "moeserve: received {}, draining in-flight requests (grace {} s; a second SIGTERM, SIGINT "
      "or SIGHUP stops at once)",
      ShutdownSignals::Name(signal_number), options.shutdown_grace_seconds);
  health.SetNotReady();
  (*engine)->StopAccepting();

  // gRPC stops taking calls at once and waits for the running ones; the engine ends what is
  // left at the end of the grace period (or at a second signal), so their clients get
  // UNAVAILABLE with a message. gRPC's own deadline, a little later, only cancels handlers that
  // still cannot finish (a client that stopped reading).
  const auto grace = milliseconds(static_cast<int64_t>(options.shutdown_grace_seconds * 1000));
  const auto grace_end = std::chrono::steady_clock::now() + grace;
  std::atomic<bool> drained{false};
  std::thread drain([&] {
    const auto deadline = std::chrono::system_clock::now() + grace + std::chrono::seconds(5);
    server->Shutdown(deadline);
    if (admin_server != nullptr) admin_server->Shutdown(deadline);
    if (http != nullptr) http->Drain(deadline);
    drained = true;
  });
  int exit_code = kExitStopped;
  while (!drained.load()) {
    const auto left =
        std::chrono::duration_cast<milliseconds>(grace_end - std::chrono::steady_clock::now());
    if (left.count() <= 0) {
      spdlog::info(
          "moeserve: the grace period is over; requests still running end with UNAVAILABLE");
      break;
    }
    const int second = ShutdownSignals::Next(std::min(left, milliseconds(100)));
    if (second != 0) {
      spdlog::info(
          "moeserve: received a second signal ({}), stopping now; requests still running end "
          "with UNAVAILABLE",
          ShutdownSignals::Name(second));
      exit_code = kExitStoppedAtOnce;
      break;
    }
  }
  health.StopWatching();
  (*engine)->Shutdown();
  drain.join();
  server->Wait();
  if (http != nullptr) http->Stop();
  admin.reset();
  spdlog::info("moeserve: stopped");
  return exit_code;
}

}  // namespace moeserve::server
