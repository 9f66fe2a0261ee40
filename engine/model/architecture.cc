#include "engine/model/architecture.h"

#include <algorithm>
#include <array>

#include "absl/strings/str_join.h"

namespace moeserve::engine {
namespace {

constexpr std::array<Architecture, 4> kArchitectures = {{
    {.family = ModelFamily::kDeepSeekV3,
     .model_type = "deepseek_v3",
     .hf_class = "DeepseekV3ForCausalLM",
     .attention = AttentionType::kMultiHeadLatent,
     .default_scoring = ScoringFunction::kSigmoid,
     .default_topk = TopKMethod::kNoAuxTc,
     .normalizes_single_expert = true,
     .scales_after_normalizing = true,
     .qk_norm = false,
     .mixtral_tensor_names = false,
     .runs_on_gpu = true},
    {.family = ModelFamily::kDeepSeekV2,
     .model_type = "deepseek_v2",
     .hf_class = "DeepseekV2ForCausalLM",
     .attention = AttentionType::kMultiHeadLatent,
     .default_scoring = ScoringFunction::kSoftmax,
     .default_topk = TopKMethod::kGreedy,
     .normalizes_single_expert = false,
     .scales_after_normalizing = false,
     .qk_norm = false,
     .mixtral_tensor_names = false,
     .runs_on_gpu = true},
    {.family = ModelFamily::kQwen3Moe,
     .model_type = "qwen3_moe",
     .hf_class = "Qwen3MoeForCausalLM",
     .attention = AttentionType::kGroupedQuery,
     .default_scoring = ScoringFunction::kSoftmax,
     .default_topk = TopKMethod::kGreedy,
     .normalizes_single_expert = true,
     .scales_after_normalizing = false,
     .qk_norm = true,
     .mixtral_tensor_names = false,
     .runs_on_gpu = true},
    {.family = ModelFamily::kMixtral,
     .model_type = "mixtral",
     .hf_class = "MixtralForCausalLM",
     .attention = AttentionType::kGroupedQuery,
     .default_scoring = ScoringFunction::kSoftmax,
     .default_topk = TopKMethod::kGreedy,
     .normalizes_single_expert = true,
     .scales_after_normalizing = false,
     .qk_norm = false,
     .mixtral_tensor_names = true,
     .runs_on_gpu = true},
}};

}  // namespace

const Architecture* FindArchitecture(std::string_view model_type) {
  for (const Architecture& architecture : kArchitectures) {
    if (model_type == architecture.model_type) return &architecture;
  }
  return nullptr;
}

const Architecture& ArchitectureOf(const ModelConfig& config) {
  const Architecture* architecture = FindArchitecture(config.model_type);
  // A config that passed validation names a supported family; fall back to the default
  // family only for hand-built configs (tests) that left model_type at its default.
  return architecture != nullptr ? *architecture : kArchitectures[0];
}

std::string SupportedModelTypes() {
  return absl::StrJoin(kArchitectures, ", ",
                       [](std::string* out, const Architecture& a) { out->append(a.model_type); });
}

RoutingRule RoutingRuleOf(const ModelConfig& c) {
  const Architecture& architecture = ArchitectureOf(c);
  RoutingRule rule;
  rule.num_experts = std::max(c.n_routed_experts, 1);
  rule.top_k = std::max(c.num_experts_per_tok, 1);
  rule.sigmoid = c.scoring_func == ScoringFunction::kSigmoid;
  rule.group_limited = c.topk_method != TopKMethod::kGreedy && c.n_group > 1;
  rule.num_groups = rule.group_limited ? c.n_group : 1;
  rule.topk_groups = rule.group_limited ? c.topk_group : 1;
  rule.group_score_top2_sum = c.topk_method == TopKMethod::kNoAuxTc;
  rule.normalize =
      c.norm_topk_prob && (c.num_experts_per_tok > 1 || architecture.normalizes_single_expert);
  rule.scaling = (!rule.normalize || architecture.scales_after_normalizing)
                     ? static_cast<float>(c.routed_scaling_factor)
                     : 1.0f;
  return rule;
}

}  // namespace moeserve::engine
