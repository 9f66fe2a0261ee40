// Architecture: the one description of each supported model family. What differs between
// DeepSeek-V3, DeepSeek-V2, Qwen3-MoE and Mixtral beyond the numbers of config.json is decided
// here, once: the attention kind, the routing rule's defaults and quirks, the names of the
// checkpoint's tensors, the Hugging Face class written on export, and whether the GPU backend
// runs it. Config parsing, the checkpoint reader, the CPU routing and the GPU backend all ask
// this registry instead of comparing `model_type` strings.
//
// Immutable tables; thread-safe.
#pragma once

#include <string>
#include <string_view>

#include "engine/model/model_config.h"

namespace moeserve::engine {

enum class ModelFamily { kDeepSeekV3, kDeepSeekV2, kQwen3Moe, kMixtral };

struct Architecture {
  ModelFamily family;
  const char* model_type;  // config.json's `model_type`
  const char* hf_class;    // config.json's `architectures[0]` on export
  AttentionType attention;
  // Routing defaults when config.json does not say (DeepSeek configs may override them).
  ScoringFunction default_scoring;
  TopKMethod default_topk;
  // DeepSeek-V2 renormalizes the top-k weights only when more than one expert is chosen; the
  // others whenever norm_topk_prob asks.
  bool normalizes_single_expert;
  // DeepSeek-V3 scales the weights by routed_scaling_factor even after renormalizing; the
  // others scale only instead of renormalizing (Qwen3-MoE and Mixtral have a factor of 1).
  bool scales_after_normalizing;
  // Qwen3: an RMSNorm over each head's query and key before RoPE.
  bool qk_norm;
  // Mixtral's tensor names: `block_sparse_moe.experts.N.w1/w3/w2` for gate/up/down.
  bool mixtral_tensor_names;
  // The GPU backend runs it (MLA and grouped-query attention models alike).
  bool runs_on_gpu;
};

// The family of a `model_type`, or null when moeserve does not serve it.
const Architecture* FindArchitecture(std::string_view model_type);
// The family of a validated config (whose model_type is always a supported one).
const Architecture& ArchitectureOf(const ModelConfig& config);
// "deepseek_v3, deepseek_v2, qwen3_moe, mixtral", for messages.
std::string SupportedModelTypes();

// How a config's router turns gate logits into (expert, weight) pairs: the rule the CPU's
// RouteTokens and the GPU's gate kernel both apply.
struct RoutingRule {
  int num_experts = 1;
  int top_k = 1;
  bool sigmoid = true;         // else softmax scores
  bool group_limited = false;  // choose the top groups first
  int num_groups = 1;
  int topk_groups = 1;
  bool group_score_top2_sum = true;  // DeepSeek-V3; else the group's best score (V2)
  bool normalize = true;             // renormalize the chosen weights to sum to 1
  float scaling = 1.0f;              // then multiply by this
};
RoutingRule RoutingRuleOf(const ModelConfig& config);

}  // namespace moeserve::engine
