// Model: the MoE transformer forward pass (embedding → [RMSNorm → attention → RMSNorm → MLP/MoE]
// × L → RMSNorm → LM head) over a batch of sequence chunks with a paged KV cache. Attention is
// DeepSeek's MLA or grouped-query attention (Qwen3-MoE, Mixtral), chosen by the config.
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
#include "engine/model/gqa_attention.h"
#include "engine/model/kv_rows.h"
#include "engine/model/model_config.h"
#include "engine/model/moe.h"
#include "engine/model/rope.h"
#include "engine/model/weights.h"

namespace moeserve::engine {

// New tokens of one sequence in a forward step.
struct BatchSequence {
  std::span<const int32_t> tokens;
  int start_position = 0;                             // tokens of this sequence already cached
  const std::vector<int32_t>* block_table = nullptr;  // must cover start_position + tokens
  bool all_logits = false;  // logits for every new token instead of only the last one
};

class Model {
 public:
  explicit Model(ModelWeights weights);
  // A model whose weights stay in `source` (a checkpoint read on demand) and are not in host
  // memory: `weights` holds only the config. Only a GPU backend, which reads what each rank
  // holds from the source, runs it; Forward() and the pieces below need host weights.
  Model(ModelWeights weights, std::shared_ptr<const TensorSource> source);

  const ModelConfig& config() const { return weights_.config(); }
  const ModelWeights& weights() const { return weights_; }
  // Where the weights are read from by name: the checkpoint, or the host weights.
  const TensorSource& tensor_source() const {
    return source_ != nullptr ? *source_ : static_cast<const TensorSource&>(weights_);
  }
  // Whether the weights are in host memory (the CPU engine can run the model).
  bool has_host_weights() const { return source_ == nullptr; }
  const RotaryEmbedding& rope() const { return rope_; }
  // Floats per KV cache row: MLA's latent + rope key, or GQA's keys + values of every KV head.
  int kv_row_dim() const {
    return config().uses_mla() ? config().kv_lora_rank + config().qk_rope_head_dim
                               : GroupedQueryAttention::RowDim(config());
  }
  // MoE layer index (0-based among MoE layers) of a model layer, or -1 for dense layers.
  int moe_index(int layer) const { return moe_index_[layer]; }

  // Runs the batch on one rank holding every expert and returns logits [rows, vocab]: one row
  // per sequence (its last token), or one per token for sequences with all_logits, in batch
  // order. The expert-parallel driver (engine/parallel/) composes the same pieces below.
  std::vector<float> Forward(std::span<const BatchSequence> batch, KvRows& cache) const;

  // --- Pieces of the forward pass, for parallel drivers. `residual` is [tokens, hidden]. ---
  // Token layout of a batch: one span per sequence chunk, in batch order.
  static std::vector<SequenceSpan> Layout(std::span<const BatchSequence> batch, int* num_tokens);
  void Embed(std::span<const BatchSequence> batch, float* residual) const;
  // residual += attention(input_norm(residual)); then `normed` = post_attention_norm(residual).
  void AttentionBlock(int layer, std::span<const SequenceSpan> spans, int num_tokens, KvRows& cache,
                      float* residual, float* normed) const;
  // residual += dense MLP(normed) (layers before first_k_dense_replace).
  void DenseBlock(int layer, const float* normed, int num_tokens, float* residual) const;
  Routing Route(int layer, const float* normed, int num_tokens) const;
  // Shared experts' output [tokens, hidden] (empty when the model has none).
  std::vector<float> SharedExperts(int layer, const float* normed, int num_tokens) const;
  // residual += combine(routing, expert outputs) + shared.
  void FinishMoe(const Routing& routing, const float* expert_outputs, const float* shared,
                 int num_tokens, float* residual) const;
  // Final norm and LM head over the chosen rows of `residual`.
  std::vector<float> Head(const float* residual, std::span<const int> rows) const;
  // The rows that need logits for a batch (see Forward).
  static std::vector<int> LogitRows(std::span<const BatchSequence> batch,
                                    std::span<const SequenceSpan> spans);

 private:
  ModelWeights weights_;
  std::shared_ptr<const TensorSource> source_;  // null: the host weights
  RotaryEmbedding rope_;
  MlaAttention attention_;
  GroupedQueryAttention grouped_query_attention_;
  std::vector<int> moe_index_;
};

}  // namespace moeserve::engine
