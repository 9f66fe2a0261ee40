// CommunicationThread: a rank's worker thread for asynchronous collectives. Work runs in
// submission order (so every rank issues its collectives in the same order), while the rank's
// compute thread goes on; Wait() on the returned handle joins it. This is the CPU stand-in for
// a dedicated communication stream on a GPU.
//
// Submit() and the handles are called from the owning compute thread only.
#pragma once

#include <condition_variable>
#include <deque>
#include <functional>
#include <future>
#include <mutex>
#include <thread>

#include "absl/status/status.h"

namespace moeserve::engine::parallel {

class CommunicationThread {
 public:
  CommunicationThread();
  ~CommunicationThread();

  // Queues `work`; the future resolves with its status.
  std::future<absl::Status> Submit(std::function<absl::Status()> work);

 private:
  void Run();
  std::mutex mutex_;
  std::condition_variable ready_;
  std::deque<std::packaged_task<absl::Status()>> queue_;
  bool stopping_ = false;
  std::thread thread_;
};

}  // namespace moeserve::engine::parallel
