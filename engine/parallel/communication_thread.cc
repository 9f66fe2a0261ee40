#include "engine/parallel/communication_thread.h"

namespace moeserve::engine::parallel {

CommunicationThread::CommunicationThread() : thread_([this] { Run(); }) {}

CommunicationThread::~CommunicationThread() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  ready_.notify_one();
  thread_.join();
}

std::future<absl::Status> CommunicationThread::Submit(std::function<absl::Status()> work) {
  std::packaged_task<absl::Status()> task(std::move(work));
  std::future<absl::Status> result = task.get_future();
  {
    std::lock_guard lock(mutex_);
    queue_.push_back(std::move(task));
  }
  ready_.notify_one();
  return result;
}

void CommunicationThread::Run() {
  while (true) {
    std::packaged_task<absl::Status()> task;
    {
      std::unique_lock lock(mutex_);
      ready_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping with nothing left
      task = std::move(queue_.front());
      queue_.pop_front();
    }
    task();
  }
}

}  // namespace moeserve::engine::parallel
