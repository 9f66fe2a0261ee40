// Multi-head latent attention (MLA), DeepSeek-V2/V3 style, over the paged latent KV cache.
//
// Inference uses the "absorbed" form: each head's key up-projection is folded into its query
// and its value up-projection is applied after attention, so attention runs directly over the
// cached latents. Stateless apart from the weights it reads; safe to call from many threads on
// disjoint KV rows.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "engine/model/kv_rows.h"
#include "engine/model/model_config.h"
#include "engine/model/rope.h"
#include "engine/model/weights.h"

namespace moeserve::engine {

// A run of consecutive new tokens of one sequence inside a batch.
struct SequenceSpan {
  int token_offset = 0;  // first row of this sequence's tokens in the batch
  int num_tokens = 0;
  int start_position = 0;  // position of the first new token (= tokens already cached)
  const std::vector<int32_t>* block_table = nullptr;
};

class MlaAttention {
 public:
  MlaAttention(const ModelConfig& config, const RotaryEmbedding& rope)
      : config_(config), rope_(rope) {}

  // `normed_input` [num_tokens, hidden]; writes `output` [num_tokens, hidden]. Stores each new
  // token's latent and rope key in `cache` (layer `layer`), then attends causally over the
  // sequence's cached tokens.
  void Forward(int layer, const AttentionWeights& weights, const float* normed_input,
               int num_tokens, std::span<const SequenceSpan> sequences, KvRows& cache,
               float* output) const;

 private:
  const ModelConfig& config_;
  const RotaryEmbedding& rope_;
};

}  // namespace moeserve::engine
