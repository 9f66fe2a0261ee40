// What a moeserve process (serve, frontend, rank) tells probes about itself, through the
// grpc.health.v1 service on its gRPC port and the moeserve_serving gauge:
//   "" and "moeserve.v1.Generation"  the whole process serves (the same as "readiness");
//   "readiness"                      SERVING once loaded and while every group serves;
//   "moeserve.v1.Generation/<group>" one expert-parallel group serves;
//   "liveness"                       SERVING from the start (loading included) until the process
//                                    is wedged: a rank loop stalled for --liveness-stall-seconds,
//                                    or (where the process cannot re-form it) a failed group.
// Kubernetes probes: startup and readiness on "readiness", liveness on "liveness".
//
// Thread-safe: every method may be called from any thread; the liveness watch runs on a thread
// of its own, stopped by StopWatching() or the destructor.
#pragma once

#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "engine/engine.h"
#include "grpcpp/health_check_service_interface.h"
#include "prometheus/gauge.h"
#include "prometheus/registry.h"

namespace moeserve::server {

inline constexpr char kGenerationService[] = "moeserve.v1.Generation";
inline constexpr char kReadinessService[] = "readiness";
inline constexpr char kLivenessService[] = "liveness";

struct LivenessPolicy {
  // A rank loop that has not come round for this long makes the process not live. It must
  // exceed the collective timeout (a rank waiting for a slow peer is not wedged).
  double stall_seconds = 120;
  // Whether a failed group makes the process not live: true where nothing but a restart brings
  // the group back (`serve`, whose ranks are its threads).
  bool group_failure_is_fatal = false;
};

class ProcessHealth {
 public:
  // Starts NOT_SERVING (every name above but "liveness", which starts SERVING). `registry` may
  // be null.
  ProcessHealth(grpc::HealthCheckServiceInterface& health, prometheus::Registry* registry,
                std::vector<std::string> groups);
  ~ProcessHealth();
  ProcessHealth(const ProcessHealth&) = delete;
  ProcessHealth& operator=(const ProcessHealth&) = delete;

  // Publishes every group's health from `engine` and readiness = all of them serve.
  void PublishFrom(const engine::Engine& engine);
  // Readiness and every group NOT_SERVING (draining, stopping).
  void SetNotReady();
  // Checks `engine` every second against `policy` until StopWatching; `engine` must outlive it.
  void WatchLiveness(const engine::Engine& engine, LivenessPolicy policy);
  void StopWatching();

 private:
  void SetReadyLocked(bool ready) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_);
  void SetGroupLocked(const std::string& group, bool serving) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_);

  grpc::HealthCheckServiceInterface& health_;
  const std::vector<std::string> groups_;
  prometheus::Gauge* serving_gauge_ = nullptr;
  absl::Mutex mutex_;
  bool live_ ABSL_GUARDED_BY(mutex_) = true;
  std::unique_ptr<absl::Notification> stop_watch_;
  std::thread watch_;
};

}  // namespace moeserve::server
