#include "engine/api/request.h"

#include "absl/time/time.h"

namespace moeserve::engine {

void RequestStream::Push(GenerationOutput output) {
  absl::MutexLock lock(&mutex_);
  queue_.push_back(std::move(output));
  ready_.Signal();
}

std::optional<GenerationOutput> RequestStream::Next(std::chrono::milliseconds timeout) {
  absl::MutexLock lock(&mutex_);
  const absl::Time deadline = absl::Now() + absl::FromChrono(timeout);
  while (queue_.empty()) {
    if (ready_.WaitWithDeadline(&mutex_, deadline)) break;
  }
  if (queue_.empty()) return std::nullopt;
  GenerationOutput output = std::move(queue_.front());
  queue_.pop_front();
  return output;
}

}  // namespace moeserve::engine
