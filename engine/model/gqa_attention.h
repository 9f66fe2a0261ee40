// Grouped-query attention (GQA) as Qwen3-MoE and Mixtral use it, over the paged KV cache.
//
// A KV cache row of one token holds its rotated keys for every key/value head, then its values
// for every key/value head: 2 * num_key_value_heads * head_dim floats. Query head h reads
// key/value head h / (num_attention_heads / num_key_value_heads). Qwen3's per-head RMSNorm of
// queries and keys (qk_norm) runs before RoPE. Called by Model::AttentionBlock; stateless apart
// from the weights it reads, so it is safe to call from many threads on disjoint KV rows.
#pragma once

#include <span>

#include "engine/model/attention.h"
#include "engine/model/kv_rows.h"
#include "engine/model/model_config.h"
#include "engine/model/rope.h"
#include "engine/model/weights.h"

namespace moeserve::engine {

class GroupedQueryAttention {
 public:
  GroupedQueryAttention(const ModelConfig& config, const RotaryEmbedding& rope)
      : config_(config), rope_(rope) {}

  // Floats per KV cache row.
  static int RowDim(const ModelConfig& config) {
    return 2 * config.num_key_value_heads * config.head_dim;
  }

  // `normed_input` [num_tokens, hidden]; writes `output` [num_tokens, hidden]. Stores each new
  // token's keys and values in `cache` (layer `layer`), then attends causally over the
  // sequence's cached tokens.
  void Forward(int layer, const AttentionWeights& weights, const float* normed_input,
               int num_tokens, std::span<const SequenceSpan> sequences, KvRows& cache,
               float* output) const;

 private:
  const ModelConfig& config_;
  const RotaryEmbedding& rope_;
};

}  // namespace moeserve::engine
