// ComputeGroupLogits: one forward pass of a token sequence on an expert-parallel group, for
// `moeserve logits --ep N` and the invariance tests. Every rank holds its own copy of the
// sequence (DP attention) so every rank dispatches tokens to every other; rank 0's logits are
// returned, with the largest difference any other rank's copy showed.
// Stateless; call from any thread (it starts the ranks' threads itself).
#pragma once

#include <vector>

#include "absl/status/statusor.h"
#include "engine/backend/rank_backend.h"
#include "engine/model/model.h"
#include "engine/parallel/ep_group.h"

namespace moeserve::engine::tools {

struct GroupLogits {
  std::vector<float> logits;         // [tokens, vocab] of rank 0
  double max_rank_difference = 0.0;  // max |rank r - rank 0| over ranks and values
  parallel::ParallelMetrics::Totals communication;
};

absl::StatusOr<GroupLogits> ComputeGroupLogits(const Model& model, std::span<const int32_t> tokens,
                                               const parallel::GroupOptions& options,
                                               ExpertPlacement placement,
                                               TraceRecorder* trace = nullptr,
                                               const RankBackendFactory& backend_factory = {});

// `factory` with every rank's request asking for an FP8 checkpoint's experts and dense
// projections in FP8 or dequantized to bf16 (RankBackendRequest::keep_fp8_experts and
// keep_fp8_dense): `logits --gpu-expert-weights / --gpu-dense-weights` and tests.
RankBackendFactory WithGpuWeightFormats(RankBackendFactory factory, bool fp8_experts,
                                        bool fp8_dense);

}  // namespace moeserve::engine::tools
