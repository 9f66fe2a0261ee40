// The Admin API's bearer token: read from --admin-token-file and refused when it is short or a
// placeholder, so that a manifest's example value never starts a server.
//
// A token must be at least kMinAdminTokenLength characters drawn from at least
// kMinAdminTokenDistinctCharacters distinct printable characters, and must not contain a word
// that marks an example ("change", "replace", "example", "placeholder", ...). `openssl rand -hex
// 32` makes a good one. Pure functions; thread-safe.
#pragma once

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace moeserve::server {

inline constexpr int kMinAdminTokenLength = 32;
inline constexpr int kMinAdminTokenDistinctCharacters = 12;

// OK when `token` is long and varied enough and not a placeholder; INVALID_ARGUMENT saying which
// rule it breaks (without echoing the token).
absl::Status CheckAdminTokenStrength(const std::string& token);

// Reads the token (first line, surrounding whitespace trimmed) from a regular file and checks it.
absl::StatusOr<std::string> ReadAdminToken(const std::string& path);

}  // namespace moeserve::server
