// Scheduler: which of one rank's sequences run in its next step, and with how many tokens.
//
// - Admission in arrival order: a queued sequence enters only once the KV blocks for its
//   prompt + max_tokens are reserved (so it never runs out mid-stream) and fewer than
//   max_running sequences run. The first one whose blocks do not fit yet lets later ones that
//   do fit pass it, at most max_overtakes times; then admission waits for it. So a short request
//   does not wait behind long ones for blocks it does not need, and a long one is not starved.
// - Chunked prefill within a token budget: every decoding sequence takes one token, then the
//   prefilling sequences share what is left of max_batch_tokens in max-min fair shares (a
//   prompt shorter than its share is served whole, the others get equal chunks; tokens left by
//   the division go to the oldest). A short prompt admitted after long ones finishes its prefill
//   in its first steps instead of after theirs.
// - Cancellation: a cancelled sequence leaves the queue or the running set at the next
//   admission, and its blocks return to the allocator.
//
// Pure bookkeeping: no model, backend or stream messages (the rank worker does those), so it is
// unit-tested alone.
// Thread rules: Enqueue(), Stop() and the counters may be called from any thread; everything
// else from the rank's own thread.
#pragma once

#include <atomic>
#include <cstdint>
#include <deque>
#include <memory>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "engine/model/model.h"
#include "engine/runtime/block_allocator.h"
#include "engine/runtime/sequence.h"

namespace moeserve::engine {

struct SchedulerLimits {
  int max_batch_tokens = 256;  // tokens per step
  int max_running = 64;        // sequences admitted at once
  int kv_block_size = 16;      // tokens per KV block
  int kv_blocks = 0;           // blocks of the rank's cache
  // How many later sequences may be admitted past one whose blocks do not fit yet.
  int max_overtakes = 64;
};

// The next step of a rank: one batch row per member; members[i] runs batch[i].
struct StepPlan {
  std::vector<BatchSequence> batch;
  std::vector<Sequence*> members;
  int64_t tokens = 0;
  // Whether members[i]'s row completes its known tokens, so that it needs a next token.
  std::vector<bool> samples;
};

class Scheduler {
 public:
  explicit Scheduler(SchedulerLimits limits);

  // Queues a sequence. Returns it back (not taken) once Stop() was called.
  std::unique_ptr<Sequence> Enqueue(std::unique_ptr<Sequence> sequence);
  // Stops taking sequences and returns the queued ones (the caller ends them).
  std::deque<std::unique_ptr<Sequence>> Stop();

  // Admits queued sequences that fit (see above). Returns the ones admitted (still owned by
  // the scheduler) and moves cancelled ones, queued or running, to `cancelled` with their
  // blocks returned.
  std::vector<Sequence*> Admit(std::vector<std::unique_ptr<Sequence>>& cancelled);
  // The next step's batch over the running sequences.
  StepPlan Plan() const;
  // Advances each member past the tokens its row ran.
  void Advance(const StepPlan& plan);
  // Takes a running sequence out (finished, failed or handed off) and returns its blocks.
  std::unique_ptr<Sequence> Release(Sequence* sequence);
  // Takes every running sequence out (the rank stops), blocks returned.
  std::vector<std::unique_ptr<Sequence>> ReleaseAll();

  int queued() const { return queued_count_.load(); }
  int running() const { return running_count_.load(); }
  int kv_blocks_free() const { return kv_blocks_free_.load(); }
  int kv_blocks_total() const { return limits_.kv_blocks; }
  const SchedulerLimits& limits() const { return limits_; }

 private:
  void RefreshCounts();

  SchedulerLimits limits_;
  BlockAllocator allocator_;                        // rank thread only
  std::vector<std::unique_ptr<Sequence>> running_;  // rank thread only, admission order

  absl::Mutex queue_mutex_;
  std::deque<std::unique_ptr<Sequence>> queue_ ABSL_GUARDED_BY(queue_mutex_);
  bool stopped_ ABSL_GUARDED_BY(queue_mutex_) = false;
  std::atomic<int> queued_count_{0};
  std::atomic<int> running_count_{0};
  std::atomic<int> kv_blocks_free_{0};
};

}  // namespace moeserve::engine
