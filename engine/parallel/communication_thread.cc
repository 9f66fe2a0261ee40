#include "engine/parallel/communication_thread.h"

namespace moeserve::engine::parallel {

CommunicationThread::CommunicationThread() : thread_([this] { Run(); }) {}

CommunicationThread::~CommunicationThread() {
  {
    absl::MutexLock lock(&mutex_);
    stopping_ = true;
  }
  thread_.join();
}

std::future<absl::Status> CommunicationThread::Submit(std::function<absl::Status()> work) {
  std::packaged_task<absl::Status()> task(std::move(work));
  std::future<absl::Status> result = task.get_future();
  {
    absl::MutexLock lock(&mutex_);
    queue_.push_back(std::move(task));
  }
  return result;
}

void CommunicationThread::Run() {
  while (true) {
    std::packaged_task<absl::Status()> task;
    {
      absl::MutexLock lock(&mutex_);
      mutex_.Await(absl::Condition(
          +[](CommunicationThread* self) ABSL_EXCLUSIVE_LOCKS_REQUIRED(self->mutex_) {
            return self->stopping_ || !self->queue_.empty();
          },
          this));
      if (queue_.empty()) return;  // stopping with nothing left
      task = std::move(queue_.front());
      queue_.pop_front();
    }
    task();
  }
}

}  // namespace moeserve::engine::parallel
