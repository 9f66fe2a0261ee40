// CommunicationThread: a rank's worker thread for asynchronous collectives. Work runs in
// submission order (so every rank issues its collectives in the same order), while the rank's
// compute thread goes on; Wait() on the returned handle joins it. This is the CPU stand-in for
// a dedicated communication stream on a GPU.
//
// Submit() and the handles are called from the owning compute thread only.
#pragma once

#include <deque>
#include <functional>
#include <future>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"

namespace moeserve::engine::parallel {

class CommunicationThread {
 public:
  CommunicationThread();
  ~CommunicationThread();

  // Queues `work`; the future resolves with its status.
  std::future<absl::Status> Submit(std::function<absl::Status()> work);

 private:
  void Run();
  absl::Mutex mutex_;
  std::deque<std::packaged_task<absl::Status()>> queue_ ABSL_GUARDED_BY(mutex_);
  bool stopping_ ABSL_GUARDED_BY(mutex_) = false;
  std::thread thread_;
};

}  // namespace moeserve::engine::parallel
