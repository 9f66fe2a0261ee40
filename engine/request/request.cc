#include "engine/request/request.h"

namespace moeserve::engine {

void RequestStream::Push(GenerationOutput output) {
  {
    std::lock_guard lock(mutex_);
    queue_.push_back(std::move(output));
  }
  ready_.notify_one();
}

std::optional<GenerationOutput> RequestStream::Next(std::chrono::milliseconds timeout) {
  std::unique_lock lock(mutex_);
  if (!ready_.wait_for(lock, timeout, [&] { return !queue_.empty(); })) return std::nullopt;
  GenerationOutput output = std::move(queue_.front());
  queue_.pop_front();
  return output;
}

}  // namespace moeserve::engine
