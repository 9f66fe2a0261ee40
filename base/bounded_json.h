// JSON from files and the network, parsed with a bounded nesting depth.
//
// nlohmann::json copies, compares, prints and destroys nested values recursively, so a document
// nested a million levels deep (a few megabytes of `[`) overflows the stack of whoever touches
// it. Every JSON document that comes from outside the process (config.json, tokenizer.json,
// safetensors headers, placement files, Prometheus answers, request bodies) goes through
// ParseBoundedJson instead of nlohmann::json::parse; real documents of these kinds nest fewer
// than ten levels.
//
// Pure functions; safe to call from any thread.
#pragma once

#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace moeserve::base {

// Deeper than any JSON document moeserve reads, shallow enough for recursion over it.
inline constexpr int kMaxJsonNestingDepth = 64;

// INVALID_ARGUMENT when arrays and objects in `text` nest deeper than `max_depth`. A linear scan
// that skips strings; it does not check the rest of the syntax.
absl::Status CheckJsonNesting(std::string_view text, int max_depth = kMaxJsonNestingDepth);

// Parses `text`: INVALID_ARGUMENT naming the problem (too deep, or the parser's message with
// its line and column) when it is not one valid JSON document. Messages do not say "JSON" or
// where the text came from; the caller adds both.
absl::StatusOr<nlohmann::json> ParseBoundedJson(std::string_view text,
                                                int max_depth = kMaxJsonNestingDepth);

}  // namespace moeserve::base
