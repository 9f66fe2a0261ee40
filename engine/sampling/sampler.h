// Sampler: picks the next token from logits — greedy, or temperature with top-k and top-p —
// from a per-request random stream, so the same seed gives the same tokens.
//
// The rule walks candidates in descending logit order (ties to the lower id) and almost always
// stops after a few of them, so it also runs from a row's head alone: a GPU backend ranks each
// row's head on the device (kernels/sampling.h) and hands the sampler only that, falling back to
// the whole row in the rare case the walk goes past the head. Both paths take the same draws and
// pick the same tokens, up to the rounding of the normalizing sums (added in another order, or
// on the GPU): a draw would have to fall within about 1e-16 of a boundary to differ.
// A small per-request state; not shared between threads.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <random>
#include <span>
#include <string>

#include "absl/status/statusor.h"
#include "engine/api/request.h"
#include "kernels/logit_head.h"

namespace moeserve::engine {

class Sampler {
 public:
  // A missing seed draws one from the system's entropy.
  explicit Sampler(const SamplingOptions& options);
  int32_t Sample(std::span<const float> logits);
  // The random stream's state, to continue it in another process (disaggregated serving).
  std::string SaveState() const;
  absl::Status RestoreState(const std::string& state);

  // --- Sampling from a row's head, for logits that are not on the host ---
  // What this request needs ranked of a row of `vocab` logits (greedy: the largest only).
  kernels::LogitHeadParams HeadParams(int vocab) const;
  // The next token from a row's head as HeadParams asked for it (ids and values in descending
  // order) and, where HeadParams set kept_weight_needed, the kept set's weight. Takes the same
  // draw as Sample(); only if the rule walks past the head does it ask `whole_row` for the row.
  using RowSource = std::function<absl::StatusOr<std::span<const float>>()>;
  absl::StatusOr<int32_t> SampleFromHead(std::span<const int32_t> ids,
                                         std::span<const float> values, double kept_weight,
                                         int vocab, const RowSource& whole_row);

 private:
  bool greedy() const { return options_.temperature <= 0.0f; }
  // The request's next uniform draw in [0, 1): one per sampled (non-greedy) token.
  double NextDraw();
  // The token for `draw` from the head; nullopt when the rule walks past it.
  std::optional<int32_t> PickFromHead(std::span<const int32_t> ids, std::span<const float> values,
                                      double kept_weight, int vocab, double draw) const;
  // The token for `draw` from a whole row of logits.
  int32_t PickFromRow(std::span<const float> logits, double draw) const;

  SamplingOptions options_;
  std::mt19937_64 rng_;
};

// Index of the largest logit; the lowest index wins ties.
int32_t ArgMax(std::span<const float> logits);

}  // namespace moeserve::engine
