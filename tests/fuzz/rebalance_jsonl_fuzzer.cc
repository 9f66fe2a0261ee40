// Fuzzes `moeserve-eplb rebalance`'s input: JSON Lines of load matrices and cluster shapes,
// through the same function the tool runs (parsing, validation, the EPLB algorithm, output).
#include <cstddef>
#include <cstdint>
#include <sstream>
#include <string>

#include "eplb/rebalance_tool.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::istringstream input(std::string(reinterpret_cast<const char*>(data), size));
  std::ostringstream output;
  std::ostringstream summary;
  (void)moeserve::eplb::RunRebalanceTool(input, output, &summary);
  return 0;
}
