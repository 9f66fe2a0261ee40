// Sequence: one request inside the engine — its tokens, KV blocks, sampler, streaming and stop
// state, timings — as it moves from a waiting queue to a rank, and from a prefill rank to a
// decode rank. Owned by exactly one rank (or queue) at a time; not thread-safe.
#pragma once

#include <chrono>
#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include "engine/api/request.h"
#include "engine/model/tokenizer.h"
#include "engine/sampling/sampler.h"

namespace moeserve::engine {

struct Sequence {
  using Clock = std::chrono::steady_clock;

  GenerationInput input;
  std::shared_ptr<RequestStream> stream;  // reset once the last message is pushed
  std::vector<int32_t> tokens;            // prompt, then generated tokens
  int prompt_length = 0;
  int num_cached = 0;           // tokens whose KV rows are in the owning rank's cache
  std::vector<int32_t> blocks;  // reserved for prompt + max_tokens on admission
  std::unique_ptr<Sampler> sampler;
  Utf8StreamDecoder decoder;
  std::string held_text;  // text that may still become a stop string
  int generated = 0;
  // How often the scheduler admitted a later sequence while this one waited for its KV blocks
  // (engine/runtime/scheduler.h bounds it).
  int times_overtaken = 0;
  Clock::time_point arrival, prefill_start, first_token, last_token;
  // Prefill → decode handoff: the cached KV rows (RankBackend::ExportKv's layout), written into
  // the decode rank's cache when it admits the sequence.
  std::vector<std::byte> handoff_kv;

  bool finished() const { return stream == nullptr; }
};

}  // namespace moeserve::engine
