// The standard Prometheus process series of a Linux process, read from /proc/self at each
// scrape: process_cpu_seconds_total, process_resident_memory_bytes,
// process_virtual_memory_bytes, process_open_fds, process_max_fds, process_start_time_seconds
// and process_threads (the names every Prometheus client library uses, so stock dashboards and
// alerts work). Every MetricsListener shows them.
//
// Thread-safe: Collect reads /proc and keeps no state.
#pragma once

#include <memory>

#include "prometheus/collectable.h"

namespace moeserve::base {

std::shared_ptr<prometheus::Collectable> NewProcessMetrics();

}  // namespace moeserve::base
