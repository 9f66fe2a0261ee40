// The Prometheus /metrics listener of moeserve's processes (the server, the rank processes and
// the EPLB controller): an HTTP endpoint that serializes the registries handed to it in the text
// exposition format on every scrape.
//
// Why not prometheus-cpp's own exposer: it embeds civetweb, whose worker threads get a fixed
// 100 KiB stack, and glibc carves every thread's static TLS (OpenBLAS alone takes 60 KiB) out of
// that stack, so a scrape overflowed it and killed the process. cpp-httplib's threads have the
// default stack. Plain HTTP only: /metrics binds a private address (loopback, the pod network).
// SO_REUSEPORT is off, so a second process cannot bind a taken port and split its scrapes.
//
// Thread-safe: RegisterCollectable may be called while scrapes are served; destruction stops the
// listener and waits for the scrape in progress.
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "prometheus/collectable.h"

namespace moeserve::base {

class MetricsListener {
 public:
  // Listens on host:port (port 0 picks a free one); UNAVAILABLE naming the address when it
  // cannot be bound. Every series shown gets `constant_labels` it does not already carry (a
  // rank process's `group` and `rank`); the process_* series (process_metrics.h) are always
  // shown.
  static absl::StatusOr<std::unique_ptr<MetricsListener>> Start(
      const std::string& host, int port,
      std::vector<std::pair<std::string, std::string>> constant_labels = {});
  virtual ~MetricsListener() = default;

  // Adds a registry to what /metrics shows; it is dropped once it expires.
  virtual void RegisterCollectable(const std::weak_ptr<prometheus::Collectable>& collectable) = 0;
  // The port listened on (the chosen one after port 0).
  virtual int port() const = 0;
};

}  // namespace moeserve::base
