#include "engine/trace/trace_recorder.h"

#include <fstream>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace moeserve::engine {

void TraceRecorder::NameProcess(int pid, std::string name) {
  absl::MutexLock lock(&mutex_);
  process_names_[pid] = std::move(name);
}

void TraceRecorder::NameThread(int pid, int tid, std::string name) {
  absl::MutexLock lock(&mutex_);
  thread_names_[{pid, tid}] = std::move(name);
}

void TraceRecorder::Complete(int pid, int tid, std::string name, std::string category,
                             Clock::time_point start, Clock::time_point end) {
  const double ts = std::chrono::duration<double, std::micro>(start - origin_).count();
  const double dur = std::chrono::duration<double, std::micro>(end - start).count();
  absl::MutexLock lock(&mutex_);
  events_.push_back({pid, tid, std::move(name), std::move(category), ts, dur});
}

size_t TraceRecorder::num_events() const {
  absl::MutexLock lock(&mutex_);
  return events_.size();
}

absl::Status TraceRecorder::WriteJson(const std::string& path) const {
  nlohmann::json events = nlohmann::json::array();
  {
    absl::MutexLock lock(&mutex_);
    for (const auto& [pid, name] : process_names_) {
      events.push_back({{"ph", "M"},
                        {"name", "process_name"},
                        {"pid", pid},
                        {"tid", 0},
                        {"args", {{"name", name}}}});
    }
    for (const auto& [ids, name] : thread_names_) {
      events.push_back({{"ph", "M"},
                        {"name", "thread_name"},
                        {"pid", ids.first},
                        {"tid", ids.second},
                        {"args", {{"name", name}}}});
    }
    for (const Event& e : events_) {
      events.push_back({{"ph", "X"},
                        {"name", e.name},
                        {"cat", e.category},
                        {"pid", e.pid},
                        {"tid", e.tid},
                        {"ts", e.ts_us},
                        {"dur", e.dur_us}});
    }
  }
  std::ofstream out(path);
  if (!out) return absl::InvalidArgumentError(absl::StrCat("trace: cannot write ", path));
  out << nlohmann::json{{"traceEvents", events}, {"displayTimeUnit", "ms"}}.dump() << "\n";
  if (!out) return absl::InternalError(absl::StrCat("trace: failed writing ", path));
  return absl::OkStatus();
}

}  // namespace moeserve::engine
