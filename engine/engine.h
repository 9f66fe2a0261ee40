// engine::Engine — the serving engine behind the gRPC front end: validates and admits
// generation requests, runs continuous batching with chunked prefill over a paged KV cache,
// samples, detokenizes, applies stop conditions and streams results.
//
// The one entry point the server uses; no protobuf here. Submit(), Stats(), StopAccepting()
// and Shutdown() are thread-safe. One internal thread runs the step loop.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/model/model.h"
#include "engine/model/tokenizer.h"
#include "engine/runtime/kv_cache.h"
#include "engine/runtime/metrics.h"
#include "engine/runtime/request.h"

namespace moeserve::engine {

struct EngineOptions {
  int max_batch_tokens = 256;     // tokens per forward step; long prompts prefill in chunks
  int max_running_requests = 64;  // requests decoding together
  int max_queue = 256;            // waiting requests before RESOURCE_EXHAUSTED
  int kv_block_size = 16;         // tokens per KV cache block
  int64_t kv_cache_bytes = 256ll << 20;
  int max_stop_strings = 16;
  int max_stop_string_bytes = 256;
  int max_request_id_bytes = 256;
  // Paces the step loop to at least this long per step (0 = as fast as possible). For demos
  // and for tests that need requests to stay in flight long enough to cancel them.
  double min_step_seconds = 0;
};

struct EngineStats {
  int running = 0;
  int waiting = 0;
  int kv_blocks_total = 0;
  int kv_blocks_free = 0;
  int64_t finished = 0;
  int64_t steps = 0;
};

class Engine {
 public:
  static absl::StatusOr<std::unique_ptr<Engine>> Create(std::shared_ptr<const Model> model,
                                                        std::shared_ptr<const Tokenizer> tokenizer,
                                                        EngineOptions options,
                                                        EngineMetrics metrics = {});
  ~Engine();

  // Validates the request (INVALID_ARGUMENT with an actionable message), queues it
  // (RESOURCE_EXHAUSTED when the queue is full; UNAVAILABLE once stopped) and returns its stream.
  absl::StatusOr<std::shared_ptr<RequestStream>> Submit(GenerationInput input);

  EngineStats Stats() const;
  const ModelConfig& config() const { return model_->config(); }
  bool has_tokenizer() const { return tokenizer_ != nullptr; }
  const EngineOptions& options() const { return options_; }

  // New submissions get UNAVAILABLE; queued and running requests continue.
  void StopAccepting();
  // Stops the loop; unfinished requests end with FinishReason::kAborted.
  void Shutdown();

 private:
  using Clock = std::chrono::steady_clock;
  struct Sequence;

  Engine(std::shared_ptr<const Model> model, std::shared_ptr<const Tokenizer> tokenizer,
         EngineOptions options, EngineMetrics metrics, int num_blocks);
  absl::Status Validate(GenerationInput& input) const;
  void Loop();
  bool Step();
  void AdmitWaiting();
  void Emit(Sequence& sequence, int32_t token);
  void Finish(Sequence& sequence, FinishReason reason, GenerationOutput output);
  void PublishState();

  std::shared_ptr<const Model> model_;
  std::shared_ptr<const Tokenizer> tokenizer_;
  EngineOptions options_;
  EngineMetrics metrics_;
  KvCache cache_;

  mutable std::mutex mutex_;
  std::condition_variable work_available_;
  std::deque<std::unique_ptr<Sequence>> waiting_;  // guarded by mutex_
  bool accepting_ = true;                           // guarded by mutex_
  bool stopping_ = false;                           // guarded by mutex_
  std::atomic<int> running_count_{0};
  std::atomic<int> free_blocks_{0};
  std::atomic<int64_t> finished_{0};
  std::atomic<int64_t> steps_{0};
  std::atomic<uint64_t> next_request_number_{0};

  std::vector<std::unique_ptr<Sequence>> running_;  // step-loop thread only
  std::thread loop_;
};

}  // namespace moeserve::engine
