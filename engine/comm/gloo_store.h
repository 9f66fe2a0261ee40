// GlooStore: a KeyValueStore (engine/api/key_value_store.h) as the rendezvous store Gloo
// contexts connect through. Gloo expects failures as exceptions; they carry the store's message.
// Thread-safe as the wrapped store is.
#pragma once

#include <gloo/rendezvous/store.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "engine/api/key_value_store.h"

namespace moeserve::engine::comm {

class GlooStore : public gloo::rendezvous::Store {
 public:
  GlooStore(std::shared_ptr<KeyValueStore> store, std::chrono::milliseconds timeout)
      : store_(std::move(store)), timeout_(timeout) {}

  void set(const std::string& key, const std::vector<char>& data) override;
  std::vector<char> get(const std::string& key) override;
  void wait(const std::vector<std::string>& keys) override { wait(keys, timeout_); }
  void wait(const std::vector<std::string>& keys,
            const std::chrono::milliseconds& timeout) override;

 private:
  std::shared_ptr<KeyValueStore> store_;
  std::chrono::milliseconds timeout_;
};

}  // namespace moeserve::engine::comm
