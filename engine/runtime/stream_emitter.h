// StreamEmitter: turns a sequence's next token into its stream's messages — the token, its text
// (UTF-8 held back until complete), stop strings cut before their first byte (and a suffix that
// could still grow into one held back), the end on <eos>, a stop token, max_tokens or the
// context length, and on the last message the usage and timings — and records the request
// metrics (time to first token, inter-token latency, tokens, final status).
//
// Holds no state of its own (a sequence carries its decoder and held-back text); called by the
// rank's thread that owns the sequence.
#pragma once

#include <cstdint>

#include "absl/status/status.h"
#include "engine/model/tokenizer.h"
#include "engine/runtime/metrics.h"
#include "engine/runtime/sequence.h"

namespace moeserve::engine {

class StreamEmitter {
 public:
  // `tokenizer` may be null (token ids only); `metrics` must outlive the emitter.
  StreamEmitter(const Tokenizer* tokenizer, int eos_token_id, int context_length,
                EngineMetrics& metrics)
      : tokenizer_(tokenizer),
        eos_token_id_(eos_token_id),
        context_length_(context_length),
        metrics_(metrics) {}

  // Appends `token` to the sequence and streams it. Returns the reason the sequence ends
  // (kNone while it goes on); on an end the caller releases the sequence's blocks, then calls
  // Finish() with the returned output, so that the KV gauges show the blocks free before the
  // client sees the last message.
  struct Emitted {
    FinishReason reason = FinishReason::kNone;
    GenerationOutput last;  // the last message's content when reason != kNone
  };
  Emitted Emit(Sequence& sequence, int32_t token) const;
  // Pushes the last message (with usage) and ends the stream.
  void Finish(Sequence& sequence, FinishReason reason, GenerationOutput output = {}) const;
  // Ends the stream with `failure` (a non-OK status) instead of a last message.
  void Fail(Sequence& sequence, const absl::Status& failure) const;
  // Ends this process's stream of a sequence that went on to a decode rank in another process.
  void HandedOff(Sequence& sequence) const;

 private:
  const Tokenizer* tokenizer_;
  int eos_token_id_;
  int context_length_;
  EngineMetrics& metrics_;
};

}  // namespace moeserve::engine
