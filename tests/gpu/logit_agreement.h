// How the GPU backend tests compare logits: a whole expert-parallel group's logits of a prompt
// (ranks as threads, on the GPU backend or the fp32 CPU one), and their agreement — the largest
// error over the largest logit, the median of that ratio per position, and how often the argmax
// is the same. Test-only; every function is self-contained.
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/backend/cuda/cuda_backend_factory.h"
#include "engine/tools/group_logits.h"

namespace moeserve::testing {

struct LogitAgreement {
  double relative_error = 0;    // max |gpu - cpu| / max |cpu|
  double median_row_error = 0;  // median over positions of that ratio within the row
  double argmax_agreement = 0;
};

inline LogitAgreement CompareLogits(const std::vector<float>& gpu, const std::vector<float>& cpu,
                                    int vocab) {
  LogitAgreement result;
  double diff = 0, scale = 0;
  for (size_t i = 0; i < cpu.size(); ++i) {
    diff = std::max(diff, static_cast<double>(std::fabs(gpu[i] - cpu[i])));
    scale = std::max(scale, static_cast<double>(std::fabs(cpu[i])));
  }
  result.relative_error = diff / scale;
  const size_t rows = cpu.size() / vocab;
  std::vector<double> row_errors;
  int same = 0;
  for (size_t r = 0; r < rows; ++r) {
    double row_diff = 0, row_scale = 0;
    for (size_t i = r * vocab; i < (r + 1) * vocab; ++i) {
      row_diff = std::max(row_diff, static_cast<double>(std::fabs(gpu[i] - cpu[i])));
      row_scale = std::max(row_scale, static_cast<double>(std::fabs(cpu[i])));
    }
    row_errors.push_back(row_diff / row_scale);
    auto argmax = [&](const std::vector<float>& v) {
      return std::max_element(v.begin() + r * vocab, v.begin() + (r + 1) * vocab) - v.begin();
    };
    same += argmax(gpu) == argmax(cpu) ? 1 : 0;
  }
  std::sort(row_errors.begin(), row_errors.end());
  result.median_row_error = row_errors[row_errors.size() / 2];
  result.argmax_agreement = static_cast<double>(same) / rows;
  return result;
}

// The logits of `tokens` from a group of `ep` ranks with `redundant` extra expert slots, made by
// `factory` (empty: the CPU backend); the ranks' trace events go to `trace` if given.
inline absl::StatusOr<std::vector<float>> GroupLogitsFrom(const engine::RankBackendFactory& factory,
                                                          const engine::Model& model,
                                                          const std::vector<int32_t>& tokens,
                                                          int ep, int redundant,
                                                          bool overlap = false,
                                                          engine::TraceRecorder* trace = nullptr) {
  const engine::ModelConfig& c = model.config();
  engine::parallel::GroupOptions options;
  options.name = "test";
  options.size = ep;
  options.two_batch_overlap = overlap;
  options.overlap_min_tokens = 1;
  auto placement = engine::ExpertPlacement::Default(c.num_moe_layers(), c.n_routed_experts,
                                                    c.n_routed_experts + redundant);
  auto result = engine::tools::ComputeGroupLogits(model, tokens, options, std::move(placement),
                                                  trace, factory);
  if (!result.ok()) return result.status();
  return std::move(result->logits);
}

// The logits of `tokens` from a group of `ep` ranks with `redundant` extra expert slots, on the
// GPU backend (`gpu`) or the CPU one. With `ranks_share_gpus`, ranks beyond the visible GPUs
// share them, exchanging through host memory (tests on one GPU). Without `fp8_experts`, an FP8
// checkpoint's experts are dequantized to bf16 on the GPU; with `fp8_dense` its dense projections
// stay FP8 too.
inline absl::StatusOr<std::vector<float>> GroupLogits(const engine::Model& model,
                                                      const std::vector<int32_t>& tokens, int ep,
                                                      int redundant, bool gpu, bool overlap = false,
                                                      bool ranks_share_gpus = false,
                                                      bool fp8_experts = true,
                                                      bool fp8_dense = false) {
  engine::RankBackendFactory factory;
  if (gpu) factory = engine::cuda::MakeCudaBackendFactory({.ranks_share_gpus = ranks_share_gpus});
  if (gpu) {
    factory = engine::tools::WithGpuWeightFormats(std::move(factory), fp8_experts, fp8_dense);
  }
  return GroupLogitsFrom(factory, model, tokens, ep, redundant, overlap);
}

}  // namespace moeserve::testing
