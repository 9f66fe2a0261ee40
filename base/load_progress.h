// How far this process is in loading its model's weights: one process-wide tracker that the
// weight readers advance and that reports itself two ways:
//   - progress lines on the log (at most one every few seconds, and the last): bytes read of
//     the total, GB/s, ETA;
//   - the gauge moeserve_model_load_progress_ratio (0..1; 1 once loaded) on /metrics, for
//     dashboards and for alerts on a load that stalls.
// Health stays NOT_SERVING until the load is done (process_health.h); this only says how far.
//
// Thread-safe: Begin/Advance/Finish and the collectable may run on any thread (the readers may
// be several); progress lines are rate-limited under a mutex.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "prometheus/collectable.h"

namespace moeserve::base {

class LoadProgress {
 public:
  static LoadProgress& Global();

  // A load of `total_bytes` of `what` (a checkpoint folder) starts.
  void Begin(const std::string& what, uint64_t total_bytes);
  // `bytes` more have been read.
  void Advance(uint64_t bytes);
  // The load is over (whatever was counted): the gauge reads 1 and a last line is logged.
  void Finish();

  double ratio() const;

  // moeserve_model_load_progress_ratio, for a MetricsListener.
  static std::shared_ptr<prometheus::Collectable> NewCollectable();

 private:
  void LogLocked(bool last) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_);

  mutable absl::Mutex mutex_;
  std::string what_ ABSL_GUARDED_BY(mutex_);
  uint64_t total_bytes_ ABSL_GUARDED_BY(mutex_) = 0;
  uint64_t done_bytes_ ABSL_GUARDED_BY(mutex_) = 0;
  bool finished_ ABSL_GUARDED_BY(mutex_) = false;
  bool started_ ABSL_GUARDED_BY(mutex_) = false;
  absl::Time start_ ABSL_GUARDED_BY(mutex_);
  absl::Time last_line_ ABSL_GUARDED_BY(mutex_);
};

}  // namespace moeserve::base
