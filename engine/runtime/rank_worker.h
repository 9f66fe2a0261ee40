// RankWorker: the thread of one rank of an expert-parallel group. It owns the rank's paged KV
// cache and the sequences assigned to it (DP attention), and runs the step loop: admit queued
// sequences (reserving KV blocks for prompt + max_tokens), agree with the other ranks, run the
// rank's part of the forward step (an empty batch when idle but others work), sample, stream,
// apply stop conditions, and — in a prefill group — hand finished prompts to a decode rank.
//
// Enqueue(), load() and the KV gauges are thread-safe; everything else runs on the worker's
// own thread.
#pragma once

#include <atomic>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

#include "engine/backend/rank_backend.h"
#include "engine/model/model.h"
#include "engine/model/tokenizer.h"
#include "engine/parallel/ep_group.h"
#include "engine/runtime/block_allocator.h"
#include "engine/runtime/injected_fault.h"
#include "engine/runtime/metrics.h"
#include "engine/runtime/sequence.h"

namespace moeserve::engine {

enum class GroupRole { kMixed, kPrefill, kDecode };

// What every worker of an engine shares. Owned by the Engine; outlives the workers.
struct WorkerContext {
  const Model* model = nullptr;
  const Tokenizer* tokenizer = nullptr;  // may be null
  EngineMetrics* metrics = nullptr;
  int max_batch_tokens = 256;
  int max_running_requests = 64;
  double min_step_seconds = 0;
  std::atomic<bool>* stop_requested = nullptr;
  // Called by prefill ranks with a prefilled sequence for the decode group.
  std::function<void(std::unique_ptr<Sequence>)> hand_off;
  // Called after any change of queue/KV state, to refresh the aggregate gauges.
  std::function<void()> publish_state;
  // Trace: how many working steps to record (0 = none), after how many unrecorded ones;
  // trace_complete is called once that many are recorded.
  int trace_steps = 0;
  int trace_skip_steps = 0;
  std::function<void()> trace_complete;
  std::optional<InjectedFault> injected_fault;
};

class RankWorker {
 public:
  // `backend` computes the rank's forward steps (CPU or GPU).
  RankWorker(const WorkerContext& context, parallel::ExpertParallelGroup& group, int rank,
             GroupRole role, int kv_blocks, int kv_block_size,
             std::unique_ptr<RankBackend> backend);
  ~RankWorker();

  void Start();
  void Join();

  // Queues a sequence for admission on this rank. Once the rank has stopped (its group failed,
  // or the engine shut down) the sequence ends at once: UNAVAILABLE with the group's failure,
  // or FinishReason::kAborted.
  void Enqueue(std::unique_ptr<Sequence> sequence);
  // Ends queued sequences that were never admitted (after Join, at shutdown).
  void AbortQueued();

  // Running + queued sequences (for choosing the least loaded rank).
  int load() const { return running_count_.load() + queued_count_.load(); }
  int queued() const { return queued_count_.load(); }
  int running() const { return running_count_.load(); }
  int kv_blocks_free() const { return kv_blocks_free_.load(); }
  int kv_blocks_total() const { return kv_blocks_total_; }

 private:
  void Loop();
  // Returns false when the group agreed to stop.
  bool Step();
  void Admit();
  void DropCancelled();
  void AfterForward(std::vector<BatchSequence>& batch, std::vector<Sequence*>& members,
                    std::span<const int32_t> next_tokens);
  void Emit(Sequence& sequence, int32_t token);
  void HandOff(Sequence& sequence);
  void Finish(Sequence& sequence, FinishReason reason, GenerationOutput output);
  // Fails the group (ExpertParallelGroup::Fail, so that the other ranks stop at their next
  // collective instead of waiting for this one), ends every request of this rank with the
  // group's failure and stops taking new ones.
  void FailGroup(const absl::Status& status);
  // Ends a sequence that never reached a step with the group's failure.
  void FailSequence(Sequence& sequence, const absl::Status& failure);
  // The injected fault, when it is this rank's and this step's; returns false if the step must
  // not go on.
  bool InjectFault();
  void RefreshCounts();

  const WorkerContext& context_;
  parallel::ExpertParallelGroup& group_;
  int rank_;
  GroupRole role_;
  std::unique_ptr<RankBackend> backend_;
  BlockAllocator allocator_;
  int kv_block_size_;
  int kv_blocks_total_;

  std::mutex queue_mutex_;
  std::deque<std::unique_ptr<Sequence>> queue_;  // guarded by queue_mutex_
  bool stopped_ = false;                         // guarded by queue_mutex_
  std::atomic<int> queued_count_{0};
  std::atomic<int> running_count_{0};
  std::atomic<int> kv_blocks_free_{0};

  std::vector<std::unique_ptr<Sequence>> running_;  // worker thread only
  int traced_steps_ = 0;
  int working_steps_ = 0;      // steps the group agreed had work (the same count on every rank)
  int traced_candidates_ = 0;  // working steps seen while a trace recorder is set
  std::thread thread_;
};

}  // namespace moeserve::engine
