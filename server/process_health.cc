#include "server/process_health.h"

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "spdlog/spdlog.h"

namespace moeserve::server {

ProcessHealth::ProcessHealth(grpc::HealthCheckServiceInterface& health,
                             prometheus::Registry* registry, std::vector<std::string> groups)
    : health_(health), groups_(std::move(groups)) {
  if (registry != nullptr) {
    serving_gauge_ = &prometheus::BuildGauge()
                          .Name("moeserve_serving")
                          .Help(
                              "1 while the process serves (health `readiness` SERVING): "
                              "loaded and every group healthy")
                          .Register(*registry)
                          .Add({});
  }
  absl::MutexLock lock(&mutex_);
  health_.SetServingStatus(kLivenessService, true);
  SetReadyLocked(false);
  for (const std::string& group : groups_) SetGroupLocked(group, false);
}

ProcessHealth::~ProcessHealth() { StopWatching(); }

void ProcessHealth::SetReadyLocked(bool ready) {
  health_.SetServingStatus("", ready);
  health_.SetServingStatus(kGenerationService, ready);
  health_.SetServingStatus(kReadinessService, ready);
  if (serving_gauge_ != nullptr) serving_gauge_->Set(ready ? 1 : 0);
}

void ProcessHealth::SetGroupLocked(const std::string& group, bool serving) {
  health_.SetServingStatus(absl::StrCat(kGenerationService, "/", group), serving);
}

void ProcessHealth::PublishFrom(const engine::Engine& engine) {
  absl::MutexLock lock(&mutex_);
  bool all_healthy = true;
  for (const engine::GroupHealth& group : engine.Health()) {
    SetGroupLocked(group.group, group.status.ok());
    all_healthy = all_healthy && group.status.ok();
  }
  SetReadyLocked(all_healthy);
}

void ProcessHealth::SetNotReady() {
  absl::MutexLock lock(&mutex_);
  SetReadyLocked(false);
  for (const std::string& group : groups_) SetGroupLocked(group, false);
}

void ProcessHealth::WatchLiveness(const engine::Engine& engine, LivenessPolicy policy) {
  StopWatching();
  stop_watch_ = std::make_unique<absl::Notification>();
  absl::Notification* stop = stop_watch_.get();
  watch_ = std::thread([this, &engine, policy, stop] {
    while (!stop->WaitForNotificationWithTimeout(absl::Seconds(1))) {
      std::string reason;
      const double stalled = engine.Stats().seconds_since_progress;
      if (stalled > policy.stall_seconds) {
        reason = absl::StrCat("a rank loop has not come round for ", static_cast<int>(stalled),
                              " s (--liveness-stall-seconds ", policy.stall_seconds, ")");
      }
      if (policy.group_failure_is_fatal) {
        for (const engine::GroupHealth& group : engine.Health()) {
          if (!group.status.ok()) {
            reason =
                absl::StrCat("only a restart brings back the failed group `", group.group, "`");
          }
        }
      }
      absl::MutexLock lock(&mutex_);
      const bool live = reason.empty();
      if (live == live_) continue;
      live_ = live;
      health_.SetServingStatus(kLivenessService, live);
      if (live) {
        spdlog::warn("moeserve: liveness SERVING again: the rank loops come round");
      } else {
        spdlog::error("moeserve: liveness NOT_SERVING: {}", reason);
      }
    }
  });
}

void ProcessHealth::StopWatching() {
  if (!watch_.joinable()) return;
  stop_watch_->Notify();
  watch_.join();
}

}  // namespace moeserve::server
