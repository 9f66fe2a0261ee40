#include "engine/runtime/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

namespace moeserve::engine {

Sampler::Sampler(const SamplingOptions& options)
    : options_(options), rng_(options.seed.has_value() ? *options.seed : std::random_device{}()) {}

int32_t ArgMax(std::span<const float> logits) {
  return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
}

int32_t Sampler::Sample(std::span<const float> logits) {
  if (options_.temperature <= 0.0f) return ArgMax(logits);
  const int vocab = static_cast<int>(logits.size());
  // Candidates in descending logit order (ties: lower id first), cut to top-k.
  std::vector<int32_t> order(vocab);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
  int keep = vocab;
  if (options_.top_k > 0) keep = std::min(keep, options_.top_k);
  std::vector<double> probabilities(keep);
  const double max_logit = logits[order[0]];
  double total = 0.0;
  for (int i = 0; i < keep; ++i) {
    probabilities[i] = std::exp((logits[order[i]] - max_logit) / options_.temperature);
    total += probabilities[i];
  }
  // Top-p: the smallest prefix whose mass reaches top_p (at least one token).
  if (options_.top_p > 0.0f && options_.top_p < 1.0f) {
    double mass = 0.0;
    int cut = keep;
    for (int i = 0; i < keep; ++i) {
      mass += probabilities[i] / total;
      if (mass >= options_.top_p) {
        cut = i + 1;
        break;
      }
    }
    keep = cut;
    total = std::accumulate(probabilities.begin(), probabilities.begin() + keep, 0.0);
  }
  // A 53-bit uniform draw; the generator's raw output is specified by the standard, so the
  // same seed gives the same tokens on every platform.
  const double u = static_cast<double>(rng_() >> 11) * (1.0 / 9007199254740992.0) * total;
  double cumulative = 0.0;
  for (int i = 0; i < keep; ++i) {
    cumulative += probabilities[i];
    if (u < cumulative) return order[i];
  }
  return order[keep - 1];
}

}  // namespace moeserve::engine
