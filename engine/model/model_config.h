// ModelConfig: the shape and hyper-parameters of a Mixture-of-Experts model: DeepSeek-V3/V2
// (multi-head latent attention), Qwen3-MoE and Mixtral (grouped-query attention).
//
// A config is parsed (hf_config.h) or defined (builtin_models.h) and validated once, at
// start-up; the rest of the engine trusts it. What distinguishes the model families is in
// architecture.h.
// Immutable after construction; safe to share between threads.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace moeserve::engine {

// How gate logits become expert scores.
enum class ScoringFunction { kSigmoid, kSoftmax };

// How the top-k experts are chosen from the scores.
enum class TopKMethod {
  kGreedy,              // plain top-k over all experts
  kGroupLimitedGreedy,  // DeepSeek-V2: group score = the group's highest score
  kNoAuxTc,             // DeepSeek-V3: group score = sum of the two highest biased scores
};

// RoPE frequency scaling. kNone = plain RoPE.
struct RopeScaling {
  enum class Type { kNone, kYarn };
  Type type = Type::kNone;
  double factor = 1.0;
  int original_max_position_embeddings = 0;
  double beta_fast = 32.0;
  double beta_slow = 1.0;
  double mscale = 1.0;
  double mscale_all_dim = 0.0;
};

// Which attention a model uses; decides the weights a layer has and what a KV cache row holds.
enum class AttentionType {
  kMultiHeadLatent,  // DeepSeek MLA: rows hold the compressed latent and the rope key
  kGroupedQuery,     // Qwen3-MoE, Mixtral: rows hold every key/value head's key and value
};

struct ModelConfig {
  std::string name;  // "builtin:tiny" or the model folder's name
  std::string model_type = "deepseek_v3";
  AttentionType attention_type = AttentionType::kMultiHeadLatent;
  int vocab_size = 0;
  int hidden_size = 0;
  int intermediate_size = 0;      // dense MLP layers
  int moe_intermediate_size = 0;  // each routed expert (and each shared expert)
  int num_hidden_layers = 0;
  int first_k_dense_replace = 0;  // the first k layers use a dense MLP
  int moe_layer_freq = 1;
  // Qwen-style MoE layer choice: when > 0, layer l is MoE iff (l + 1) % decoder_sparse_step == 0
  // and l is not in mlp_only_layers (first_k_dense_replace and moe_layer_freq are then unused).
  int decoder_sparse_step = 0;
  std::vector<int> mlp_only_layers;
  int num_attention_heads = 0;
  // MLA (multi-head latent attention).
  int q_lora_rank = 0;  // 0: queries are projected directly (no q-LoRA)
  int kv_lora_rank = 0;
  int qk_nope_head_dim = 0;
  int qk_rope_head_dim = 0;
  int v_head_dim = 0;
  // Grouped-query attention (unused by MLA).
  int num_key_value_heads = 0;
  int head_dim = 0;
  bool attention_bias = false;  // q/k/v/o projections have biases
  bool qk_norm = false;         // Qwen3: RMSNorm over each head's query and key before RoPE
  // Rope pairs: true rotates (2i, 2i+1) as DeepSeek's checkpoints store them; false rotates
  // (i, i + dim/2) ("rotate half", Llama/Qwen/Mixtral layout).
  bool rope_interleaved = true;
  // MoE.
  int n_routed_experts = 0;
  int n_shared_experts = 0;
  int num_experts_per_tok = 0;
  int n_group = 1;
  int topk_group = 1;
  ScoringFunction scoring_func = ScoringFunction::kSigmoid;
  TopKMethod topk_method = TopKMethod::kNoAuxTc;
  bool norm_topk_prob = true;
  double routed_scaling_factor = 1.0;
  // Positions and norms.
  int max_position_embeddings = 0;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  double rms_norm_eps = 1e-6;
  bool tie_word_embeddings = false;
  // Built-in GPU benchmark models only: the routed experts' weights are generated on the GPUs
  // that hold them and never exist on the host (at DeepSeek-V3's size they would not fit), so
  // such a model runs with --device cuda only.
  bool routed_experts_on_device = false;
  // With routed_experts_on_device: the generated experts are FP8 (e4m3, 128x128 block scales),
  // as DeepSeek-V3's checkpoint stores them (builtin:v3-bench-fp8).
  bool routed_experts_fp8 = false;
  int bos_token_id = 0;
  int eos_token_id = 1;

  bool uses_mla() const { return attention_type == AttentionType::kMultiHeadLatent; }
  int qk_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }
  // Dimensions RoPE rotates per head: MLA's rope part, or the whole GQA head.
  int rotary_dim() const { return uses_mla() ? qk_rope_head_dim : head_dim; }
  bool is_moe_layer(int layer) const;
  int num_moe_layers() const;
  // Softmax scale of attention, including YaRN's attention-temperature correction.
  double attention_softmax_scale() const;
};

// Upper bounds on what a config may say, far above any published model (DeepSeek-V3: 61 layers,
// 256 experts, 163,840 positions, a vocabulary of 129,280, hidden size 7,168). They keep a typo
// or a hostile config.json from sizing anything absurd before the weights are checked against
// it, and keep sums of positions and tokens inside `int`.
inline constexpr int kMaxConfigLayers = 4096;
inline constexpr int kMaxConfigRoutedExperts = 65536;
inline constexpr int kMaxConfigPositions = 1 << 24;
inline constexpr int kMaxConfigVocabulary = 1 << 24;
inline constexpr int kMaxConfigDimension = 1 << 20;  // hidden, intermediate, LoRA and head sizes
inline constexpr int kMaxConfigHeads = 4096;

// Checks the invariants the engine relies on (positive sizes within the bounds above,
// divisibility, ranges).
absl::Status ValidateModelConfig(const ModelConfig& config);

// `field` must be > 0 (INVALID_ARGUMENT naming it otherwise).
absl::Status CheckPositive(const char* field, int value);

}  // namespace moeserve::engine
