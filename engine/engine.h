// engine::Engine — the serving engine behind the gRPC front end. It validates requests, routes
// each to the least-loaded rank of its entry group, and runs expert-parallel worker groups:
// one mixed group (--ep N), or a prefill group that computes prompts and hands their KV cache
// to a decode group (--prefill-ep P --decode-ep D). Each rank runs continuous batching with
// chunked prefill over its own paged KV cache (see runtime/rank_worker.h).
//
// The one entry point the server uses; no protobuf here. All public methods are thread-safe.
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/backend/rank_backend.h"
#include "engine/model/model.h"
#include "engine/model/tokenizer.h"
#include "engine/parallel/ep_group.h"
#include "engine/request/request.h"
#include "engine/runtime/metrics.h"
#include "engine/runtime/rank_worker.h"
#include "engine/trace/trace_recorder.h"

namespace moeserve::engine {

struct ParallelOptions {
  int prefill_ep = 0;  // 0: one mixed group of decode_ep ranks
  int decode_ep = 1;
  int num_redundant_experts = 0;
  bool two_batch_overlap = false;
  int overlap_min_tokens = 32;
  // How long a rank's collective waits for the slowest peer before the group fails.
  double collective_timeout_seconds = 30;
  std::string placement_file;       // JSON; empty: the default placement
  bool expert_load_metrics = true;  // per (layer, expert) series
  std::string trace_dir;            // empty: no trace
  int trace_steps = 16;             // working steps recorded per group
  int trace_skip_steps = 0;         // working steps to let pass first (e.g. to reach decode)
};

// Where ranks compute. The CPU backend is built in; a GPU backend comes from a factory (the
// engine library itself never depends on CUDA).
struct BackendOptions {
  RankBackendFactory factory;  // null: the CPU
  int kv_element_bytes = 4;    // bytes per cached value (fp32 on the CPU, bf16 on GPUs)
  std::string name = "cpu";    // for messages
};

struct EngineOptions {
  int max_batch_tokens = 256;           // tokens per rank per step; long prompts prefill in chunks
  int max_running_requests = 64;        // sequences per rank
  int max_queue = 256;                  // queued requests (all ranks) before RESOURCE_EXHAUSTED
  int kv_block_size = 16;               // tokens per KV cache block
  int64_t kv_cache_bytes = 64ll << 20;  // per rank
  int max_stop_strings = 16;
  int max_stop_string_bytes = 256;
  int max_request_id_bytes = 256;
  // Paces every rank to at least this long per step (0 = as fast as possible). For demos and
  // for tests that need requests to stay in flight long enough to cancel them.
  double min_step_seconds = 0;
  ParallelOptions parallel;
  BackendOptions backend;
  // Tests of failure handling only: a fault injected into one rank.
  std::optional<InjectedFault> injected_fault;
};

// The health of one expert-parallel group: OK while it serves; once it failed, UNAVAILABLE
// naming the group and the first failure's reason. A failed group stays failed (recovery is a
// restart of the process).
struct GroupHealth {
  std::string group;
  absl::Status status;
};

struct EngineStats {
  int running = 0;
  int waiting = 0;
  int kv_blocks_total = 0;
  int kv_blocks_free = 0;
};

class Engine {
 public:
  // `registry` may be null (no Prometheus series).
  static absl::StatusOr<std::unique_ptr<Engine>> Create(std::shared_ptr<const Model> model,
                                                        std::shared_ptr<const Tokenizer> tokenizer,
                                                        EngineOptions options,
                                                        prometheus::Registry* registry = nullptr);
  ~Engine();

  // Validates the request (INVALID_ARGUMENT with an actionable message), queues it on a rank
  // (RESOURCE_EXHAUSTED when the queue is full; UNAVAILABLE once stopped, or when a group the
  // request needs has failed) and returns its stream. If the group fails while the request is
  // in flight, its stream ends with UNAVAILABLE and the group's failure.
  absl::StatusOr<std::shared_ptr<RequestStream>> Submit(GenerationInput input);

  EngineStats Stats() const;
  // Every group's health, entry group first.
  std::vector<GroupHealth> Health() const;
  // Called once per group failure, from the thread that failed the group, after the failure is
  // recorded (so Health() already shows it). Thread-safe; replaces any earlier listener.
  void SetGroupFailureListener(std::function<void(const GroupHealth&)> listener);
  const ModelConfig& config() const { return model_->config(); }
  bool has_tokenizer() const { return tokenizer_ != nullptr; }
  const EngineOptions& options() const { return options_; }
  // The groups, entry group first ("mixed", or "prefill" then "decode").
  std::vector<parallel::ExpertParallelGroup*> groups() const;
  parallel::ExpertParallelGroup* group(const std::string& name) const;

  // New submissions get UNAVAILABLE; queued and running requests continue.
  void StopAccepting();
  // Stops every rank at the same step; unfinished requests end with FinishReason::kAborted.
  void Shutdown();
  // Writes the trace (if --trace-dir was given) now.
  absl::Status WriteTrace() const;

 private:
  struct WorkerGroup {
    std::unique_ptr<parallel::ExpertParallelGroup> group;
    std::vector<std::unique_ptr<RankWorker>> workers;
  };

  Engine(std::shared_ptr<const Model> model, std::shared_ptr<const Tokenizer> tokenizer,
         EngineOptions options, prometheus::Registry* registry);
  absl::Status Start();
  absl::Status Validate(GenerationInput& input) const;
  absl::StatusOr<WorkerGroup> BuildGroup(const std::string& name, int size, GroupRole role,
                                         int trace_pid_offset, prometheus::Registry* registry);
  static RankWorker& LeastLoaded(const WorkerGroup& group);
  void HandOff(std::unique_ptr<Sequence> sequence);
  void PublishState();

  std::shared_ptr<const Model> model_;
  std::shared_ptr<const Tokenizer> tokenizer_;
  EngineOptions options_;
  EngineMetrics metrics_;
  prometheus::Registry* registry_;
  std::unique_ptr<TraceRecorder> trace_;
  std::atomic<bool> stop_requested_{false};
  WorkerContext context_;
  std::vector<WorkerGroup> groups_;  // entry group first; fixed after Start()

  mutable std::mutex listener_mutex_;
  std::function<void(const GroupHealth&)> failure_listener_;  // guarded by listener_mutex_

  std::mutex submit_mutex_;  // serializes rank choice and queue accounting
  bool accepting_ = true;    // guarded by submit_mutex_
  bool shut_down_ = false;   // guarded by submit_mutex_
  std::atomic<uint64_t> next_request_number_{0};
};

}  // namespace moeserve::engine
