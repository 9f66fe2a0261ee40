// What a moeserve binary reports about its build: the project version (`--version` on every
// command) and the Prometheus gauge moeserve_build_info{component, version} = 1, the usual way
// dashboards and alerts tell which version each process runs.
//
// Thread-safe (constants; registering takes the registry's own lock).
#pragma once

#include <string>

#include "prometheus/registry.h"

namespace moeserve::base {

// The project version, e.g. "0.1.0".
const char* Version();

// Adds moeserve_build_info{component="<component>", version="<Version()>"} 1 to `registry`.
void RegisterBuildInfo(prometheus::Registry& registry, const std::string& component);

}  // namespace moeserve::base
