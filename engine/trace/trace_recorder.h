// TraceRecorder: collects Chrome trace events (the trace-event JSON format that Perfetto and
// chrome://tracing open) — complete events with process/thread ids, plus process and thread
// names — and writes them as one JSON file.
//
// Thread-safe: ranks' compute and communication threads record concurrently.
#pragma once

#include <chrono>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"

namespace moeserve::engine {

class TraceRecorder {
 public:
  using Clock = std::chrono::steady_clock;
  TraceRecorder() : origin_(Clock::now()) {}

  void NameProcess(int pid, std::string name);
  void NameThread(int pid, int tid, std::string name);
  // A complete ("X") event from `start` to `end`.
  void Complete(int pid, int tid, std::string name, std::string category, Clock::time_point start,
                Clock::time_point end);
  size_t num_events() const;
  absl::Status WriteJson(const std::string& path) const;

 private:
  struct Event {
    int pid, tid;
    std::string name, category;
    double ts_us, dur_us;
  };
  Clock::time_point origin_;
  mutable absl::Mutex mutex_;
  std::vector<Event> events_ ABSL_GUARDED_BY(mutex_);
  std::map<int, std::string> process_names_ ABSL_GUARDED_BY(mutex_);
  std::map<std::pair<int, int>, std::string> thread_names_ ABSL_GUARDED_BY(mutex_);
};

// Records one complete event from construction to destruction (no-op with a null recorder).
class ScopedTraceEvent {
 public:
  ScopedTraceEvent(TraceRecorder* recorder, int pid, int tid, std::string name,
                   const char* category)
      : recorder_(recorder),
        pid_(pid),
        tid_(tid),
        name_(std::move(name)),
        category_(category),
        start_(TraceRecorder::Clock::now()) {}
  ~ScopedTraceEvent() {
    if (recorder_ != nullptr) {
      recorder_->Complete(pid_, tid_, std::move(name_), category_, start_,
                          TraceRecorder::Clock::now());
    }
  }

 private:
  TraceRecorder* recorder_;
  int pid_, tid_;
  std::string name_;
  const char* category_;
  TraceRecorder::Clock::time_point start_;
};

}  // namespace moeserve::engine
