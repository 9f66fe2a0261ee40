// The engine's public request types (those of the facade, engine/engine.h), shared with its
// callers: what a generation asks for, what it streams back, and the per-request output channel.
//
// RequestStream is the only thread-safe type here: the engine's step loop pushes into it and
// one consumer (a server handler) pops from it.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"

namespace moeserve::engine {

struct SamplingOptions {
  float temperature = 0.0f;  // 0 = greedy
  float top_p = 1.0f;        // (0, 1]
  int top_k = 0;             // 0 = off
  std::optional<uint64_t> seed;
};

// Where a prefill rank process sends a prefilled sequence (set by the cluster front end on the
// requests it sends to a prefill group's rank; engine/api/handoff.h).
struct HandoffRoute {
  std::string target;  // the decode rank's worker address
  std::string id;      // the id its awaiting stream is registered under
};

// A generation as submitted. Exactly one of `text` and `prompt_tokens` is used. Token ids are
// kept as wide as any front door sends them (proto uint32, JSON integers), so the engine's
// range check reports the id the client sent.
struct GenerationInput {
  std::string request_id;
  std::optional<std::string> text;
  std::vector<int64_t> prompt_tokens;
  SamplingOptions sampling;
  int max_tokens = 0;
  std::vector<std::string> stop;
  std::vector<int64_t> stop_token_ids;
  bool ignore_eos = false;
  std::optional<HandoffRoute> handoff;
  // Whether tokenizing `text` puts the model's beginning-of-sequence token first (when it uses
  // one). Off for text that already carries its special tokens as text, such as a rendered chat
  // template (transformers tokenizes those with add_special_tokens=False).
  bool add_special_tokens = true;
};

enum class FinishReason { kNone, kLength, kStop, kContextLength, kCancelled, kAborted };

struct Usage {
  int prompt_tokens = 0;
  int completion_tokens = 0;
  double time_to_first_token_seconds = 0;
  double total_seconds = 0;
  double queue_seconds = 0;
};

// One message of a request's stream.
struct GenerationOutput {
  std::vector<int32_t> token_ids;
  std::string text;
  FinishReason finish_reason = FinishReason::kNone;  // set on the last message
  Usage usage;                                       // set on the last message
  absl::Status status;                               // non-OK: the request failed
  // The last message of a prefill rank's stream whose sequence went on to a decode rank in
  // another process (the stream continues there).
  bool handed_off = false;
  bool is_last() const {
    return finish_reason != FinishReason::kNone || !status.ok() || handed_off;
  }
};

class RequestStream {
 public:
  explicit RequestStream(std::string request_id) : request_id_(std::move(request_id)) {}
  const std::string& request_id() const { return request_id_; }

  void Push(GenerationOutput output);
  // Asks the engine to stop this request; it frees the request's KV blocks at its next step
  // and pushes a last message with FinishReason::kCancelled.
  void Cancel() { cancelled_.store(true); }
  bool cancelled() const { return cancelled_.load(); }
  // Waits up to `timeout` for the next message; nullopt on timeout.
  std::optional<GenerationOutput> Next(std::chrono::milliseconds timeout);

 private:
  std::string request_id_;
  std::atomic<bool> cancelled_{false};
  absl::Mutex mutex_;
  absl::CondVar ready_;
  std::deque<GenerationOutput> queue_ ABSL_GUARDED_BY(mutex_);
};

}  // namespace moeserve::engine
