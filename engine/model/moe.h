// The MoE feed-forward block: gate scores, group-limited top-k routing, routed experts, shared
// experts, and the combine that sums each token's expert outputs in its own top-k order.
//
// Routing is a pure function of the gate logits, so any expert-parallel layout routes the same.
// Free functions and plain structs; safe to call from many threads on disjoint outputs.
#pragma once

#include <cstdint>
#include <vector>

#include "engine/model/model_config.h"
#include "engine/model/weights.h"

namespace moeserve::engine {

// The experts chosen for each token, best first, and their combine weights.
struct Routing {
  int num_tokens = 0;
  int top_k = 0;
  std::vector<int32_t> experts;  // [num_tokens, top_k] logical expert ids
  std::vector<float> weights;    // [num_tokens, top_k]
};

// Routes tokens from gate logits [num_tokens, num_experts]. `correction_bias` (may be null)
// shifts scores for choosing experts only, never for their weights.
Routing RouteTokens(const ModelConfig& config, const float* gate_logits, int num_tokens,
                    const float* correction_bias);

// Computes the gate logits and routes `normed_input` [num_tokens, hidden].
Routing ComputeRouting(const ModelConfig& config, const MoeWeights& weights,
                       const float* normed_input, int num_tokens);

// Runs one SwiGLU MLP over `num_rows` rows: out = down(silu(gate(x)) * up(x)).
void RunMlp(const MlpWeights& mlp, const float* input, int64_t num_rows, int hidden, float* output);

// Expert outputs for every (token, choice) pair, [num_tokens * top_k, hidden], computed by
// grouping the rows that chose the same expert.
std::vector<float> RunRoutedExpertsLocally(const MoeWeights& weights, const Routing& routing,
                                           const float* normed_input, int hidden);

// output[t] = sum over k, in order, of weight[t,k] * expert_output[t,k]  (+ shared[t] if given).
void CombineExpertOutputs(const Routing& routing, const float* expert_outputs,
                          const float* shared_output, int hidden, float* output);

}  // namespace moeserve::engine
