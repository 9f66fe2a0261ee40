// ModelConfig: the shape and hyper-parameters of a DeepSeek-style MoE model.
//
// Owns parsing of a Hugging Face `config.json` and the definitions of the built-in models. A
// config is parsed and validated once, at start-up; the rest of the engine trusts it.
// Immutable after construction; safe to share between threads.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json_fwd.hpp"

namespace moeserve::engine {

// How gate logits become expert scores.
enum class ScoringFunction { kSigmoid, kSoftmax };

// How the top-k experts are chosen from the scores.
enum class TopKMethod {
  kGreedy,                  // plain top-k over all experts
  kGroupLimitedGreedy,      // DeepSeek-V2: group score = the group's highest score
  kNoAuxTc,                 // DeepSeek-V3: group score = sum of the two highest biased scores
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

struct ModelConfig {
  std::string name;                // "builtin:tiny" or the model folder's name
  std::string model_type = "deepseek_v3";
  int vocab_size = 0;
  int hidden_size = 0;
  int intermediate_size = 0;       // dense MLP layers
  int moe_intermediate_size = 0;   // each routed expert (and each shared expert)
  int num_hidden_layers = 0;
  int first_k_dense_replace = 0;   // the first k layers use a dense MLP
  int moe_layer_freq = 1;
  int num_attention_heads = 0;
  // MLA (multi-head latent attention).
  int q_lora_rank = 0;             // 0: queries are projected directly (no q-LoRA)
  int kv_lora_rank = 0;
  int qk_nope_head_dim = 0;
  int qk_rope_head_dim = 0;
  int v_head_dim = 0;
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
  int bos_token_id = 0;
  int eos_token_id = 1;

  int qk_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }
  bool is_moe_layer(int layer) const {
    return n_routed_experts > 0 && layer >= first_k_dense_replace &&
           layer % moe_layer_freq == 0;
  }
  int num_moe_layers() const;
  // Softmax scale of attention, including YaRN's attention-temperature correction.
  double attention_softmax_scale() const;
};

// Checks the invariants the engine relies on (positive sizes, divisibility, ranges).
absl::Status ValidateModelConfig(const ModelConfig& config);

// Parses a Hugging Face config.json object. Accepts rope settings under `rope_scaling` or
// `rope_parameters`.
absl::StatusOr<ModelConfig> ParseModelConfig(const nlohmann::json& json, std::string name);

// Serializes to Hugging Face config.json keys (used when exporting the built-in weights).
nlohmann::json ModelConfigToJson(const ModelConfig& config);

// Built-in models: their names, and their configs.
std::vector<std::string> BuiltinModelNames();
absl::StatusOr<ModelConfig> BuiltinModelConfig(const std::string& name);

}  // namespace moeserve::engine
