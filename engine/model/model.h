// Model: the DeepSeek-style forward pass (embedding → [RMSNorm → MLA → RMSNorm → MLP/MoE] × L →
// RMSNorm → LM head) over a batch of sequence chunks with a paged KV cache.
//
// Owns the weights and the rotary table. Forward() is const and keeps no state between calls
// other than what it writes into the caller's KV cache, so one Model may serve several
// schedulers, each with its own cache.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/model/attention.h"
#include "engine/model/model_config.h"
#include "engine/model/moe.h"
#include "engine/model/rope.h"
#include "engine/model/weights.h"
#include "engine/runtime/kv_cache.h"

namespace moeserve::engine {

// New tokens of one sequence in a forward step.
struct BatchSequence {
  std::span<const int32_t> tokens;
  int start_position = 0;                        // tokens of this sequence already cached
  const std::vector<int32_t>* block_table = nullptr;  // must cover start_position + tokens
  bool all_logits = false;  // logits for every new token instead of only the last one
};

class Model {
 public:
  explicit Model(ModelWeights weights);

  const ModelConfig& config() const { return weights_.config(); }
  const ModelWeights& weights() const { return weights_; }
  // Floats per KV cache row (latent + rope key).
  int kv_row_dim() const { return config().kv_lora_rank + config().qk_rope_head_dim; }

  // Runs the batch and returns logits [rows, vocab]: one row per sequence (its last token), or
  // one per token for sequences with all_logits, in batch order.
  std::vector<float> Forward(std::span<const BatchSequence> batch, KvCache& cache) const;

 private:
  void FeedForward(int layer, const float* normed, int num_tokens, float* output) const;

  ModelWeights weights_;
  RotaryEmbedding rope_;
  MlaAttention attention_;
};

}  // namespace moeserve::engine
