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
    // Arrival order, except that the first sequence whose blocks do not fit yet lets later ones
    // that fit pass it, up to max_overtakes times; after that admission waits for it, so the
    // blocks freed by finishing sequences go to it.
    Sequence* waiting_for_blocks = nullptr;
    for (auto it = queue_.begin();
         it != queue_.end() && running_.size() < static_cast<size_t>(limits_.max_running);) {
      if (waiting_for_blocks != nullptr &&
          waiting_for_blocks->times_overtaken >= limits_.max_overtakes) {
        break;
      }
      Sequence& next = **it;
      const int needed =
          BlocksFor(next.prompt_length + next.input.max_tokens, limits_.kv_block_size);
      std::optional<std::vector<int32_t>> blocks = allocator_.Allocate(needed);
      if (!blocks.has_value()) {
        if (waiting_for_blocks == nullptr) waiting_for_blocks = &next;
        ++it;
        continue;
      }
      if (waiting_for_blocks != nullptr) ++waiting_for_blocks->times_overtaken;
      next.blocks = std::move(*blocks);
      admitted.push_back(&next);
      running_.push_back(std::move(*it));
      it = queue_.erase(it);
    }
    queued_count_ = static_cast<int>(queue_.size());
  }
  RefreshCounts();
  return admitted;
}

namespace {

// The most tokens each prefill may take so that all of them fit `budget` and no prefill that
// is capped gets less than one that is not (the water level of max-min fair shares).
int FairShareLevel(std::vector<int> remaining, int budget) {
  std::sort(remaining.begin(), remaining.end());
  int64_t served = 0;  // tokens of the prefills below the level, served in full
  for (size_t i = 0; i < remaining.size(); ++i) {
    const int64_t level = (budget - served) / static_cast<int64_t>(remaining.size() - i);
    if (level < remaining[i]) return static_cast<int>(level);
    served += remaining[i];
  }
  return remaining.empty() ? 0 : remaining.back();
}

}  // namespace

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
  std::vector<Sequence*> prefilling;
  std::vector<int> remaining;
  for (const auto& seq : running_) {
    if (seq->num_cached >= seq->prompt_length) {
      add(*seq, 1);
    } else {
      prefilling.push_back(seq.get());
      remaining.push_back(seq->prompt_length - seq->num_cached);
    }
  }
  if (prefilling.empty() || budget <= 0) return plan;
  // Max-min fair shares: a prompt shorter than the level is served whole, the others get the
  // level, and the tokens the division leaves go one each to the oldest prefills.
  const int level = FairShareLevel(remaining, budget);
  std::vector<int> grant(prefilling.size());
  int left = budget;
  for (size_t i = 0; i < prefilling.size(); ++i) {
    grant[i] = std::min(remaining[i], level);
    left -= grant[i];
  }
  for (size_t i = 0; i < prefilling.size() && left > 0; ++i) {
    if (grant[i] < remaining[i]) {
      ++grant[i];
      --left;
    }
  }
  for (size_t i = 0; i < prefilling.size(); ++i) {
    if (grant[i] > 0) add(*prefilling[i], grant[i]);
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
