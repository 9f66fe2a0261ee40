#include "engine/runtime/scheduler.h"

#include <algorithm>

namespace moeserve::engine {

Scheduler::Scheduler(SchedulerLimits limits)
    : limits_(limits), allocator_(limits.kv_blocks), kv_blocks_free_(limits.kv_blocks) {}

std::unique_ptr<Sequence> Scheduler::Enqueue(std::unique_ptr<Sequence> sequence) {
  absl::MutexLock lock(&queue_mutex_);
  if (stopped_) return sequence;
  queue_.push_back(std::move(sequence));
  queued_count_ = static_cast<int>(queue_.size());
  return nullptr;
}

std::deque<std::unique_ptr<Sequence>> Scheduler::Stop() {
  std::deque<std::unique_ptr<Sequence>> queued;
  absl::MutexLock lock(&queue_mutex_);
  stopped_ = true;
  queued.swap(queue_);
  queued_count_ = 0;
  return queued;
}

std::vector<Sequence*> Scheduler::Admit(std::vector<std::unique_ptr<Sequence>>& cancelled) {
  std::vector<Sequence*> admitted;
  for (auto& seq : running_) {
    if (seq->stream != nullptr && seq->stream->cancelled()) {
      allocator_.Free(seq->blocks);
      seq->blocks.clear();
      cancelled.push_back(std::move(seq));
    }
  }
  std::erase(running_, nullptr);
  {
    absl::MutexLock lock(&queue_mutex_);
    for (auto it = queue_.begin(); it != queue_.end();) {
      if ((*it)->stream != nullptr && (*it)->stream->cancelled()) {
        cancelled.push_back(std::move(*it));
        it = queue_.erase(it);
      } else {
        ++it;
      }
    }
    // First come, first served: a sequence that does not fit blocks those behind it.
    while (!queue_.empty() && running_.size() < static_cast<size_t>(limits_.max_running)) {
      Sequence& next = *queue_.front();
      const int needed =
          BlocksFor(next.prompt_length + next.input.max_tokens, limits_.kv_block_size);
      std::optional<std::vector<int32_t>> blocks = allocator_.Allocate(needed);
      if (!blocks.has_value()) break;
      next.blocks = std::move(*blocks);
      admitted.push_back(&next);
      running_.push_back(std::move(queue_.front()));
      queue_.pop_front();
    }
    queued_count_ = static_cast<int>(queue_.size());
  }
  RefreshCounts();
  return admitted;
}

StepPlan Scheduler::Plan() const {
  // Decoding sequences take one token each; prefilling ones share what is left of the budget.
  StepPlan plan;
  int budget = limits_.max_batch_tokens;
  auto add = [&](Sequence& seq, int count) {
    plan.batch.push_back({std::span<const int32_t>(&seq.tokens[seq.num_cached], count),
                          seq.num_cached, &seq.blocks, false});
    plan.members.push_back(&seq);
    plan.samples.push_back(seq.num_cached + count >= static_cast<int>(seq.tokens.size()));
    plan.tokens += count;
    budget -= count;
  };
  for (const auto& seq : running_) {
    if (seq->num_cached >= seq->prompt_length) add(*seq, 1);
  }
  for (const auto& seq : running_) {
    if (seq->num_cached < seq->prompt_length && budget > 0) {
      add(*seq, std::min(seq->prompt_length - seq->num_cached, budget));
    }
  }
  return plan;
}

void Scheduler::Advance(const StepPlan& plan) {
  for (size_t i = 0; i < plan.members.size(); ++i) {
    plan.members[i]->num_cached += static_cast<int>(plan.batch[i].tokens.size());
  }
}

std::unique_ptr<Sequence> Scheduler::Release(Sequence* sequence) {
  auto it = std::find_if(running_.begin(), running_.end(),
                         [&](const auto& owned) { return owned.get() == sequence; });
  if (it == running_.end()) return nullptr;
  std::unique_ptr<Sequence> released = std::move(*it);
  running_.erase(it);
  allocator_.Free(released->blocks);
  released->blocks.clear();
  RefreshCounts();
  return released;
}

std::vector<std::unique_ptr<Sequence>> Scheduler::ReleaseAll() {
  std::vector<std::unique_ptr<Sequence>> released;
  released.swap(running_);
  for (auto& seq : released) {
    allocator_.Free(seq->blocks);
    seq->blocks.clear();
  }
  RefreshCounts();
  return released;
}

void Scheduler::RefreshCounts() {
  running_count_ = static_cast<int>(running_.size());
  kv_blocks_free_ = allocator_.num_free();
}

}  // namespace moeserve::engine
