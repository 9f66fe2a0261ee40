#include "engine/comm/gloo_store.h"

#include <stdexcept>

namespace moeserve::engine::comm {
namespace {

[[noreturn]] void Throw(const absl::Status& status) {
  throw std::runtime_error(std::string(status.message()));
}

}  // namespace

void GlooStore::set(const std::string& key, const std::vector<char>& data) {
  if (absl::Status s = store_->Set(key, std::string(data.begin(), data.end())); !s.ok()) Throw(s);
}

std::vector<char> GlooStore::get(const std::string& key) {
  absl::StatusOr<std::string> value = store_->Get(key, timeout_);
  if (!value.ok()) Throw(value.status());
  return std::vector<char>(value->begin(), value->end());
}

void GlooStore::wait(const std::vector<std::string>& keys,
                     const std::chrono::milliseconds& timeout) {
  for (const std::string& key : keys) {
    absl::StatusOr<std::string> value = store_->Get(key, timeout);
    if (!value.ok()) Throw(value.status());
  }
}

}  // namespace moeserve::engine::comm
