// Routing for the twins' tests: each token's top_k distinct experts, chosen uniformly from a
// seeded generator. Test-only; stateless.
#pragma once

#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

namespace moeserve::kernels::testing {

inline std::vector<int32_t> RandomRouting(int tokens, int top_k, int experts, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> routed(static_cast<size_t>(tokens) * top_k);
  std::vector<int32_t> all(experts);
  for (int t = 0; t < tokens; ++t) {
    for (int e = 0; e < experts; ++e) all[e] = e;
    std::shuffle(all.begin(), all.end(), rng);
    for (int j = 0; j < top_k; ++j) routed[t * top_k + j] = all[j];
  }
  return routed;
}

}  // namespace moeserve::kernels::testing
