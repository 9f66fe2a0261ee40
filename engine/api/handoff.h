// Disaggregated serving across processes: a prefill rank computes a prompt's KV cache and first
// token, then its sequence continues on a decode rank in another process.
//
// HandoffRoute (set by the cluster front end on a request it sends to a prefill rank) says which
// decode rank takes the sequence; SequenceHandoff is everything that rank needs to continue the
// stream where the prefill rank left it (plain data, serialized by the sender); HandoffSender
// delivers it (over gRPC between rank processes). Plain data; HandoffSender implementations are
// thread-safe.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "engine/api/request.h"

namespace moeserve::engine {

struct SequenceHandoff {
  std::string handoff_id;       // the route's id: the decode rank's stream awaits it
  std::string target;           // the route's decode rank
  GenerationInput input;        // as validated (prompt tokens set, text cleared)
  std::vector<int32_t> tokens;  // prompt, then the tokens generated so far
  int prompt_length = 0;
  int num_cached = 0;  // tokens whose KV rows travel in `kv_rows`
  int generated = 0;
  std::string sampler_state;    // the request's random stream, to continue it
  std::string decoder_pending;  // incomplete UTF-8 held back
  std::string held_text;        // text held back because it may become a stop string
  double seconds_since_arrival = 0;
  double seconds_since_first_token = 0;
  double seconds_since_last_token = 0;
  double queue_seconds = 0;
  std::string kv_rows;  // the prompt's KV rows, layer-major, in the backend's type
};

class HandoffSender {
 public:
  virtual ~HandoffSender() = default;
  // Delivers `handoff` to its target; OK once the decode rank accepted it.
  virtual absl::Status Send(const SequenceHandoff& handoff) = 0;
};

}  // namespace moeserve::engine
