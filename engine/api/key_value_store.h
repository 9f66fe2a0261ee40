// KeyValueStore: the rendezvous a group's rank processes meet through — the key-value service
// of the group's leader in a deployment (moeserve rank), an in-memory map in tests. Ranks
// publish their addresses (and a GPU group its NCCL id) under keys and wait for each other's.
//
// Implementations are thread-safe.
#pragma once

#include <chrono>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace moeserve::engine {

class KeyValueStore {
 public:
  virtual ~KeyValueStore() = default;
  virtual absl::Status Set(const std::string& key, const std::string& value) = 0;
  // The value of `key`, waiting up to `timeout` for it to be set (DEADLINE_EXCEEDED after).
  virtual absl::StatusOr<std::string> Get(const std::string& key,
                                          std::chrono::milliseconds timeout) = 0;
};

}  // namespace moeserve::engine
