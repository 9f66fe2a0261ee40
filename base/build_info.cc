#include "base/build_info.h"

#include "prometheus/gauge.h"

namespace moeserve::base {

const char* Version() { return MOESERVE_VERSION; }

void RegisterBuildInfo(prometheus::Registry& registry, const std::string& component) {
  prometheus::BuildGauge()
      .Name("moeserve_build_info")
      .Help("1, labelled with the process's component and the moeserve version it runs")
      .Register(registry)
      .Add({{"component", component}, {"version", Version()}})
      .Set(1);
}

}  // namespace moeserve::base
