#include "engine/sampling/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <sstream>
#include <vector>

namespace moeserve::engine {
namespace {

// How many candidates top-k keeps of a vocabulary.
int KeepLimit(const SamplingOptions& options, int vocab) {
  return options.top_k > 0 ? std::min(vocab, options.top_k) : vocab;
}

// The rule over candidates in order, given their weights exp((logit − max) / temperature) and
// the kept set's total: top-p keeps the smallest prefix whose mass reaches top_p (at least one
// candidate), then `draw` (uniform in [0, 1)) picks by cumulative weight. `reach(i)` makes
// candidate i available and says whether it is; the walk gives up (nullopt) where it is not.
// Returns the candidate's position in the order.
template <typename Reach, typename WeightAt>
std::optional<int> WalkCandidates(const SamplingOptions& options, int keep_limit, double total,
                                  double draw, Reach&& reach, WeightAt&& weight_at) {
  int keep = keep_limit;
  if (options.top_p > 0.0f && options.top_p < 1.0f) {
    double mass = 0.0;
    double prefix = 0.0;
    for (int i = 0; i < keep; ++i) {
      if (!reach(i)) return std::nullopt;
      const double p = weight_at(i);
      mass += p / total;
      prefix += p;
      if (mass >= options.top_p) {
        keep = i + 1;
        break;
      }
    }
    total = prefix;
  }
  const double u = draw * total;
  double cumulative = 0.0;
  for (int i = 0; i < keep; ++i) {
    if (!reach(i)) return std::nullopt;
    cumulative += weight_at(i);
    if (u < cumulative) return i;
  }
  if (!reach(keep - 1)) return std::nullopt;
  return keep - 1;
}

}  // namespace

Sampler::Sampler(const SamplingOptions& options)
    : options_(options), rng_(options.seed.has_value() ? *options.seed : std::random_device{}()) {}

int32_t ArgMax(std::span<const float> logits) {
  return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
}

int32_t Sampler::Sample(std::span<const float> logits) {
  if (greedy()) return ArgMax(logits);
  return PickFromRow(logits, NextDraw());
}

double Sampler::NextDraw() {
  // 53 random bits; the generator's raw output is specified by the standard, so the same seed
  // gives the same tokens on every platform.
  return static_cast<double>(rng_() >> 11) * (1.0 / 9007199254740992.0);
}

kernels::LogitHeadParams Sampler::HeadParams(int vocab) const {
  kernels::LogitHeadParams params;
  params.keep_limit = KeepLimit(options_, vocab);
  if (greedy()) {
    params.head_size = 1;
    return params;
  }
  params.head_size = std::min(params.keep_limit, kernels::kMaxLogitHead);
  params.temperature = options_.temperature;
  params.kept_weight_needed = params.keep_limit > params.head_size;
  return params;
}

absl::StatusOr<int32_t> Sampler::SampleFromHead(std::span<const int32_t> ids,
                                                std::span<const float> values, double kept_weight,
                                                int vocab, const RowSource& whole_row) {
  const double draw = greedy() ? 0.0 : NextDraw();
  if (std::optional<int32_t> token = PickFromHead(ids, values, kept_weight, vocab, draw)) {
    return *token;
  }
  absl::StatusOr<std::span<const float>> row = whole_row();
  if (!row.ok()) return row.status();
  return PickFromRow(*row, draw);
}

std::optional<int32_t> Sampler::PickFromHead(std::span<const int32_t> ids,
                                             std::span<const float> values, double kept_weight,
                                             int vocab, double draw) const {
  if (ids.empty()) return std::nullopt;
  if (greedy()) return ids[0];
  const int keep_limit = KeepLimit(options_, vocab);
  const int available = static_cast<int>(ids.size());
  const double max_logit = values[0];
  std::vector<double> weight(available);
  for (int i = 0; i < available; ++i) {
    weight[i] = std::exp((values[i] - max_logit) / options_.temperature);
  }
  // The head holds the whole kept set where top-k keeps no more than it.
  const double total = keep_limit <= available
                           ? std::accumulate(weight.begin(), weight.begin() + keep_limit, 0.0)
                           : kept_weight;
  const std::optional<int> position = WalkCandidates(
      options_, keep_limit, total, draw, [&](int i) { return i < available; },
      [&](int i) { return weight[i]; });
  if (!position.has_value()) return std::nullopt;
  return ids[*position];
}

int32_t Sampler::PickFromRow(std::span<const float> logits, double draw) const {
  if (greedy()) return ArgMax(logits);
  const int vocab = static_cast<int>(logits.size());
  // Candidates in descending logit order, ties to the lower id. That is a strict order, so
  // sorting only a head of it gives the same head as sorting everything — and only the head is
  // usually needed: top-k cuts the order, top-p and the draw almost always stop early. A full
  // sort of DeepSeek-V3's 129K vocabulary takes about 12 ms per sampled token on one CPU core,
  // more than a whole GPU decode step of the batch (docs/PERFORMANCE.md).
  auto before = [&](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  };
  const int keep_limit = KeepLimit(options_, vocab);
  std::vector<int32_t> order(vocab);
  std::iota(order.begin(), order.end(), 0);
  if (keep_limit < vocab) {
    std::nth_element(order.begin(), order.begin() + keep_limit, order.end(), before);
  }
  // Sorted so far: order[0, sorted) is final. It grows geometrically, so reaching position i
  // costs O(n log i), never a full sort unless the rule really walks the whole vocabulary.
  constexpr int kSortedHead = 64;
  int sorted = std::min(keep_limit, kSortedHead);
  std::partial_sort(order.begin(), order.begin() + sorted, order.begin() + keep_limit, before);
  auto sort_through = [&](int index) {  // makes order[0..index] final
    if (index >= sorted) {
      const int grown = std::min(keep_limit, std::max(index + 1, 4 * sorted));
      std::partial_sort(order.begin() + sorted, order.begin() + grown, order.begin() + keep_limit,
                        before);
      sorted = grown;
    }
    return true;
  };
  const double max_logit = logits[order[0]];
  std::vector<double> weight(vocab, 0.0);  // by token id
  double total = 0.0;
  for (int i = 0; i < keep_limit; ++i) {
    const int32_t token = order[i];
    weight[token] = std::exp((logits[token] - max_logit) / options_.temperature);
    total += weight[token];
  }
  return order[*WalkCandidates(options_, keep_limit, total, draw, sort_through,
                               [&](int i) { return weight[order[i]]; })];
}

std::string Sampler::SaveState() const {
  std::ostringstream out;
  out << rng_;
  return out.str();
}

absl::Status Sampler::RestoreState(const std::string& state) {
  std::istringstream in(state);
  std::mt19937_64 restored;
  in >> restored;
  if (in.fail()) return absl::InvalidArgumentError("sampler state does not parse");
  rng_ = restored;
  return absl::OkStatus();
}

}  // namespace moeserve::engine
