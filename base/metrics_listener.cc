#include "base/metrics_listener.h"

#include <vector>

#include "absl/strings/str_cat.h"

namespace moeserve::base {

absl::StatusOr<std::unique_ptr<prometheus::Exposer>> StartMetricsListener(const std::string& host,
                                                                          int port) {
  const std::string address = absl::StrCat(host, ":", port);
  try {
    return std::make_unique<prometheus::Exposer>(address);
  } catch (const std::exception& error) {
    return absl::UnavailableError(absl::StrCat(
        "cannot serve metrics on ", address, " (address in use or not available): ", error.what()));
  }
}

int BoundPort(const prometheus::Exposer& exposer) {
  const std::vector<int> ports = exposer.GetListeningPorts();
  return ports.empty() ? 0 : ports.front();
}

}  // namespace moeserve::base
