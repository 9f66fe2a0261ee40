#include "server/rank_process.h"

#include <signal.h>
#include <sys/prctl.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <iostream>
#include <memory>

#include "absl/strings/str_cat.h"
#include "base/build_info.h"
#include "base/load_progress.h"
#include "base/metrics_listener.h"
#include "grpcpp/health_check_service_interface.h"
#include "grpcpp/server.h"
#include "grpcpp/server_builder.h"
#include "prometheus/registry.h"
#include "server/admin_service.h"
#include "server/admin_token.h"
#include "server/process_health.h"
#include "server/rendezvous.h"
#include "server/worker_service.h"
#include "spdlog/spdlog.h"

namespace moeserve::server {
namespace {

constexpr int kExitFormation = 2;
constexpr int kExitGroupFailed = 3;

// The leader's worker address: --leader, else LWS_LEADER_ADDRESS (the LeaderWorkerSet's leader
// pod) on --leader-port, else this process for rank 0.
std::string LeaderAddress(const RankOptions& options, const std::string& self) {
  if (!options.leader.empty()) return options.leader;
  if (const char* lws = std::getenv("LWS_LEADER_ADDRESS"); lws != nullptr && *lws != '\0') {
    return absl::StrCat(lws, ":", options.leader_port);
  }
  return options.rank == 0 ? self : "";
}

}  // namespace

int RunRank(const RankOptions& options) {
  // Shutdown signals are taken by the main thread only (sigtimedwait below).
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  signal(SIGPIPE, SIG_IGN);
  const std::string name = absl::StrCat("group `", options.group, "` rank ", options.rank);
  if (options.group_size < 1 || options.rank < 0 || options.rank >= options.group_size) {
    spdlog::error("moeserve rank: rank {} is outside a group of {}", options.rank,
                  options.group_size);
    return 1;
  }

  if (options.supervisor_pid > 0) {
    // A rank left behind by a supervisor that died (kill -9, OOM) would hold its GPU and ports
    // and serve no group: the kernel sends it SIGTERM when the supervisor goes, and one that is
    // already gone is noticed here.
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() != options.supervisor_pid) {
      spdlog::error("moeserve rank: {}'s node supervisor (pid {}) is gone", name,
                    options.supervisor_pid);
      return 1;
    }
  }

  auto registry = std::make_shared<prometheus::Registry>();
  base::RegisterBuildInfo(*registry, "rank");
  const std::shared_ptr<prometheus::Collectable> load_progress =
      base::LoadProgress::NewCollectable();
  std::unique_ptr<base::MetricsListener> metrics;
  int metrics_port = -1;
  if (options.metrics_port >= 0) {
    absl::StatusOr<std::unique_ptr<base::MetricsListener>> started = base::MetricsListener::Start(
        options.host, options.metrics_port,
        {{"group", options.group}, {"rank", std::to_string(options.rank)}});
    if (!started.ok()) {
      spdlog::error("moeserve rank: {}", std::string(started.status().message()));
      return 1;
    }
    metrics = *std::move(started);
    metrics->RegisterCollectable(registry);
    metrics->RegisterCollectable(load_progress);
    metrics_port = metrics->port();
  }

  // The worker API listens from the start (UNAVAILABLE until the engine is up); rank 0 also
  // hosts the rendezvous, with a new epoch.
  grpc::EnableDefaultHealthCheckService(true);
  const std::string epoch_if_leader = NewEpoch();
  std::unique_ptr<RendezvousService> rendezvous;
  if (options.rank == 0) {
    rendezvous =
        std::make_unique<RendezvousService>(options.group, options.group_size, epoch_if_leader);
  }
  absl::StatusOr<std::optional<ChatTemplateSource>> chat_template =
      LoadChatTemplateSource(options.engine.model, /*override_file=*/"");
  if (!chat_template.ok()) {
    spdlog::error("moeserve rank: chat template: {}",
                  std::string(chat_template.status().message()));
    return 1;
  }
  RankIdentity identity{options.group, options.rank, options.group_size, ""};
  auto worker = std::make_unique<WorkerService>(identity, std::move(*chat_template));
  std::unique_ptr<AdminService> admin;
  if (!options.admin_token_file.empty()) {
    absl::StatusOr<std::string> token = ReadAdminToken(options.admin_token_file);
    if (!token.ok()) {
      spdlog::error("moeserve rank: {}", std::string(token.status().message()));
      return 1;
    }
    admin = std::make_unique<AdminService>(std::move(*token));
  }
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(absl::StrCat(options.host, ":", options.port),
                           grpc::InsecureServerCredentials(), &port);
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  builder.SetMaxReceiveMessageSize(kWorkerMaxMessageBytes);
  builder.SetMaxSendMessageSize(kWorkerMaxMessageBytes);
  builder.RegisterService(worker.get());
  if (rendezvous != nullptr) builder.RegisterService(rendezvous.get());
  if (admin != nullptr) builder.RegisterService(admin.get());
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) {
    spdlog::error("moeserve rank: cannot listen on {}:{} (address in use or not available)",
                  options.host, options.port);
    return 1;
  }
  ProcessHealth health(*server->GetHealthCheckService(), registry.get(), {options.group});
  const std::string self = absl::StrCat(
      options.advertise_host.empty() ? options.host : options.advertise_host, ":", port);
  const std::string leader = LeaderAddress(options, self);
  if (leader.empty()) {
    spdlog::error(
        "moeserve rank: {} needs its leader's address: --leader HOST:PORT or LWS_LEADER_ADDRESS",
        name);
    return 1;
  }
  spdlog::info("moeserve rank: {} of {} listening on {} (metrics {}, leader {})", name,
               options.group_size, self,
               metrics_port >= 0 ? absl::StrCat("on ", options.host, ":", metrics_port) : "off",
               leader);

  const auto join_timeout =
      std::chrono::milliseconds(static_cast<int64_t>(options.join_timeout_seconds * 1000));
  auto client = std::make_shared<RendezvousClient>(leader);
  absl::StatusOr<std::string> epoch =
      client->Join(options.group, options.group_size, options.rank, self, join_timeout);
  if (!epoch.ok()) {
    spdlog::error("moeserve rank: {}: {}", name, std::string(epoch.status().message()));
    server->Shutdown();
    return kExitFormation;
  }
  worker->SetEpoch(*epoch);

  engine::EngineOptions engine_options = options.engine;
  engine::RankProcessOptions& rank_process = engine_options.rank_process.emplace();
  rank_process.group = options.group;
  rank_process.group_size = options.group_size;
  rank_process.rank = options.rank;
  rank_process.rendezvous = client;
  rank_process.rendezvous_prefix = absl::StrCat(options.group, "/", *epoch);
  rank_process.hostname = options.advertise_host.empty() ? options.host : options.advertise_host;
  rank_process.cuda_device = options.cuda_device;
  rank_process.form_timeout_seconds = options.join_timeout_seconds;
  if (options.group == "prefill") rank_process.handoff = std::make_shared<GrpcHandoffSender>();
  absl::StatusOr<std::unique_ptr<engine::Engine>> engine =
      engine::Engine::Create(engine_options, registry.get());
  if (!engine.ok()) {
    spdlog::error("moeserve rank: {}: {}", name, std::string(engine.status().message()));
    server->Shutdown();
    return engine.status().code() == absl::StatusCode::kDeadlineExceeded ? kExitFormation : 1;
  }
  base::LoadProgress::Global().Finish();
  // The group fails fast: once it failed, this process ends (the group is re-formed as a
  // whole); the main loop below notices within its poll interval.
  std::atomic<bool> group_failed{false};
  (*engine)->SetHealthListener([&](const engine::GroupHealth& group) {
    if (group.status.ok()) return;
    health.SetNotReady();
    group_failed = true;
  });
  worker->AttachEngine(engine->get());
  if (admin != nullptr) admin->AttachEngine(engine->get());
  if (absl::Status ready = client->Ready(*epoch, options.rank); !ready.ok()) {
    spdlog::error("moeserve rank: {}: {}", name, std::string(ready.message()));
    server->Shutdown();
    (*engine)->Shutdown();
    return kExitFormation;
  }
  bool failed_already = false;
  for (const engine::GroupHealth& group : (*engine)->Health()) failed_already |= !group.status.ok();
  health.PublishFrom(**engine);
  health.WatchLiveness(
      **engine, {.stall_seconds = options.liveness_stall_seconds, .group_failure_is_fatal = false});
  spdlog::info("moeserve rank: serving {} of {} (epoch {}) on {}", name, options.group_size, *epoch,
               self);

  int exit_code = 0;
  const timespec poll{0, 100 * 1000 * 1000};
  while (true) {
    siginfo_t info;
    const int signal_number = sigtimedwait(&signals, &info, &poll);
    if (signal_number == SIGTERM || signal_number == SIGINT) {
      spdlog::info("moeserve rank: {} received {}, draining in-flight requests", name,
                   signal_number == SIGTERM ? "SIGTERM" : "SIGINT");
      break;
    }
    if (group_failed.load() || failed_already) {
      for (const engine::GroupHealth& group : (*engine)->Health()) {
        if (!group.status.ok()) {
          spdlog::error("{}: {}; exiting so that the group re-forms", name,
                        std::string(group.status.message()));
        }
      }
      exit_code = kExitGroupFailed;
      break;
    }
  }
  health.SetNotReady();
  health.StopWatching();
  (*engine)->StopAccepting();
  // In-flight streams end (UNAVAILABLE after a failure) before the server closes.
  const double grace = exit_code == 0 ? options.shutdown_grace_seconds : 1.0;
  server->Shutdown(std::chrono::system_clock::now() +
                   std::chrono::milliseconds(static_cast<int64_t>(grace * 1000)));
  server->Wait();
  (*engine)->Shutdown();
  spdlog::info("moeserve rank: {} stopped", name);
  return exit_code;
}

}  // namespace moeserve::server
