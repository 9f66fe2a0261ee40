// RankWorker: the thread of one rank of an expert-parallel group, tying the rank's parts
// together. Each step: the Scheduler admits queued sequences (KV blocks reserved for
// prompt + max_tokens) and plans the batch (chunked prefill within the token budget); the rank
// agrees with its group; its RankBackend runs the rank's part of the forward step over the
// rank's own KV rows (an empty batch when idle but others work); sampled tokens go through the
// StreamEmitter; and in a prefill group a sequence whose prompt is done leaves through the
// KvTransport to a decode rank. A failed step or collective fails the group: every request of
// the rank ends UNAVAILABLE with the group's failure, and the rank stops taking new ones.
//
// Enqueue(), AbortQueued() and the counters are thread-safe; everything else runs on the
// worker's own thread.
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <optional>
#include <thread>

#include "engine/backend/rank_backend.h"
#include "engine/model/model.h"
#include "engine/model/tokenizer.h"
#include "engine/parallel/ep_group.h"
#include "engine/runtime/injected_fault.h"
#include "engine/runtime/kv_transport.h"
#include "engine/runtime/metrics.h"
#include "engine/runtime/scheduler.h"
#include "engine/runtime/sequence.h"
#include "engine/runtime/stream_emitter.h"

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
  // Where prefill ranks send prefilled sequences (prefill groups only).
  KvTransport* kv_transport = nullptr;
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
  // `backend` computes the rank's forward steps (CPU or GPU) over its `kv_blocks` blocks.
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
  int load() const { return scheduler_.running() + scheduler_.queued(); }
  int queued() const { return scheduler_.queued(); }
  int running() const { return scheduler_.running(); }
  int kv_blocks_free() const { return scheduler_.kv_blocks_free(); }
  int kv_blocks_total() const { return scheduler_.kv_blocks_total(); }
  // How long since the rank's loop last came round (an idle loop comes round every 50 ms, a
  // working one once per step); 0 once the loop has ended. For liveness: a loop stuck outside
  // a collective (whose own timeout fails the group) keeps this growing.
  double seconds_since_progress() const;

 private:
  void Loop();
  // Returns false when the rank stops (the group agreed to stop, or failed).
  bool Step();
  // Admits what fits; writes handed-off KV rows of admitted decode sequences.
  void Admit();
  void AfterForward(const StepPlan& plan, std::span<const int32_t> next_tokens);
  void HandOff(Sequence& sequence);
  // Releases a running sequence's blocks, then pushes its last message.
  void Finish(Sequence& sequence, FinishReason reason, GenerationOutput output = {});
  // Fails the group (ExpertParallelGroup::Fail, so that the other ranks stop at their next
  // collective instead of waiting for this one), ends every request of this rank with the
  // group's failure and stops taking new ones.
  void FailGroup(const absl::Status& status);
  // The injected fault, when it is this rank's and this step's; returns false if the step must
  // not go on.
  bool InjectFault();
  void PublishState() const;

  const WorkerContext& context_;
  parallel::ExpertParallelGroup& group_;
  int rank_;
  GroupRole role_;
  std::unique_ptr<RankBackend> backend_;
  Scheduler scheduler_;
  StreamEmitter emitter_;

  int traced_steps_ = 0;
  int working_steps_ = 0;      // steps the group agreed had work (the same count on every rank)
  int traced_candidates_ = 0;  // working steps seen while a trace recorder is set
  // steady_clock nanoseconds at the start of the loop's latest round; 0 when not looping.
  std::atomic<int64_t> last_round_nanos_{0};
  std::thread thread_;
};

}  // namespace moeserve::engine
