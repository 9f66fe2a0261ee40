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
  // Candidates in descending logit order, ties to the lower id. That is a strict order, so
  // sorting only a head of it gives the same head as sorting everything — and only the head is
  // usually needed: top-k cuts the order, top-p and the draw almost always stop early. A full
  // sort of DeepSeek-V3's 129K vocabulary takes about 12 ms per sampled token on one CPU core,
  // more than a whole GPU decode step of the batch (docs/PERFORMANCE.md).
  auto before = [&](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  };
  const int keep_limit = options_.top_k > 0 ? std::min(vocab, options_.top_k) : vocab;
  std::vector<int32_t> order(vocab);
  std::iota(order.begin(), order.end(), 0);
  if (keep_limit < vocab) {
    std::nth_element(order.begin(), order.begin() + keep_limit, order.end(), before);
  }
  // Sorted so far: order[0, sorted) is final. It grows geometrically, so reaching position i
  // costs O(n log i), never a full sort unless a rule really walks the whole vocabulary.
  constexpr int kSortedHead = 64;
  int sorted = std::min(keep_limit, kSortedHead);
  std::partial_sort(order.begin(), order.begin() + sorted, order.begin() + keep_limit, before);
  auto sort_through = [&](int index) {  // makes order[0..index] final
    if (index < sorted) return;
    const int grown = std::min(keep_limit, std::max(index + 1, 4 * sorted));
    std::partial_sort(order.begin() + sorted, order.begin() + grown, order.begin() + keep_limit,
                      before);
    sorted = grown;
  };
  const double max_logit = logits[order[0]];
  std::vector<double> weight(vocab, 0.0);  // by token id: exp((logit - max) / temperature)
  double total = 0.0;
  for (int i = 0; i < keep_limit; ++i) {
    const int32_t token = order[i];
    weight[token] = std::exp((logits[token] - max_logit) / options_.temperature);
    total += weight[token];
  }
  int keep = keep_limit;
  // Top-p: the smallest prefix whose mass reaches top_p (at least one token).
  if (options_.top_p > 0.0f && options_.top_p < 1.0f) {
    double mass = 0.0;
    double prefix = 0.0;
    for (int i = 0; i < keep; ++i) {
      sort_through(i);
      const double p = weight[order[i]];
      mass += p / total;
      prefix += p;
      if (mass >= options_.top_p) {
        keep = i + 1;
        break;
      }
    }
    total = prefix;
  }
  // A 53-bit uniform draw; the generator's raw output is specified by the standard, so the
  // same seed gives the same tokens on every platform.
  const double u = static_cast<double>(rng_() >> 11) * (1.0 / 9007199254740992.0) * total;
  double cumulative = 0.0;
  for (int i = 0; i < keep; ++i) {
    sort_through(i);
    cumulative += weight[order[i]];
    if (u < cumulative) return order[i];
  }
  sort_through(keep - 1);
  return order[keep - 1];
}

}  // namespace moeserve::engine
