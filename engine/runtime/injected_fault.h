// InjectedFault: a failure injected into one rank, for tests of failure handling
// (`serve --inject-fault GROUP:RANK:STEP[:hang]`). At its `step`-th working step (counted from
// 1) the rank fails its step, or, with `hang`, stops arriving at collectives so that its peers'
// collectives time out. Plain data.
#pragma once

#include <string>

namespace moeserve::engine {

struct InjectedFault {
  std::string group;
  int rank = -1;
  int step = 0;
  bool hang = false;
};

}  // namespace moeserve::engine
