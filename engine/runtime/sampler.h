// Sampler: picks the next token from logits — greedy, or temperature with top-k and top-p —
// from a per-request random stream, so the same seed gives the same tokens.
// Stateless functions plus a small per-request state; not shared between threads.
#pragma once

#include <cstdint>
#include <random>
#include <span>

#include "engine/runtime/request.h"

namespace moeserve::engine {

class Sampler {
 public:
  // A missing seed draws one from the system's entropy.
  explicit Sampler(const SamplingOptions& options);
  int32_t Sample(std::span<const float> logits);

 private:
  SamplingOptions options_;
  std::mt19937_64 rng_;
};

// Index of the largest logit; the lowest index wins ties.
int32_t ArgMax(std::span<const float> logits);

}  // namespace moeserve::engine
