// Validation of a generation request, once, at the edge of the engine: the input, the sampling
// options, the stop conditions, and whether prompt + max_tokens fit the context and a rank's KV
// cache. Messages name the field and the limit so a client can act on them.
//
// A pure function of the request, the limits and the tokenizer (it tokenizes `text`), so it is
// unit-tested and fuzzed without an engine. Thread-safe as the tokenizer is.
#pragma once

#include "absl/status/status.h"
#include "engine/api/request.h"
#include "engine/model/tokenizer.h"

namespace moeserve::engine {

// What the model and the engine's options allow one request.
struct RequestLimits {
  int vocab_size = 0;
  int context_length = 0;  // prompt + max_tokens must fit
  int max_request_id_bytes = 256;
  int max_stop_strings = 16;
  int max_stop_string_bytes = 256;
  int kv_block_size = 16;
  int kv_blocks_per_rank = 0;  // the smallest rank's cache
};

// OK, with `input.prompt_tokens` holding the tokenized `text` when text was given; otherwise
// INVALID_ARGUMENT saying what to change. `tokenizer` may be null (then text is refused).
absl::Status ValidateGenerationInput(GenerationInput& input, const RequestLimits& limits,
                                     const Tokenizer* tokenizer);

}  // namespace moeserve::engine
