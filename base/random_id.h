// RandomHexId: 16 random hex digits for ids that must not collide (request ids, OpenAI
// completion ids, handoff ids). Not for secrets.
//
// Thread-safe.
#pragma once

#include <string>

namespace moeserve::base {

std::string RandomHexId();

}  // namespace moeserve::base
