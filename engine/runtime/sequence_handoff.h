// A Sequence as a SequenceHandoff (engine/api/handoff.h) and back: what crosses from a prefill
// rank process to a decode rank process — tokens, the request, sampler and stop-string state,
// timings (as ages, so no clock is shared) and the prompt's KV rows. The stream does not cross:
// the decode side gets a new one. Stateless functions.
#pragma once

#include <cstddef>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/api/handoff.h"
#include "engine/runtime/sequence.h"

namespace moeserve::engine {

SequenceHandoff ToHandoff(const Sequence& sequence, const std::vector<std::byte>& kv_rows);

// INVALID_ARGUMENT when the handoff is inconsistent (counts, sampler state).
absl::StatusOr<std::unique_ptr<Sequence>> FromHandoff(const SequenceHandoff& handoff);

}  // namespace moeserve::engine
