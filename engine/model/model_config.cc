#include "engine/model/model_config.h"

#include <algorithm>
#include <cmath>
#include <tuple>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "engine/base/status_macros.h"

namespace moeserve::engine {
namespace {

double YarnMscale(double factor, double mscale) {
  if (factor <= 1.0) return 1.0;
  return 0.1 * mscale * std::log(factor) + 1.0;
}

}  // namespace

absl::Status CheckPositive(const char* field, int value) {
  if (value > 0) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("config: `", field, "` must be > 0, got ", value));
}

bool ModelConfig::is_moe_layer(int layer) const {
  if (n_routed_experts <= 0) return false;
  if (decoder_sparse_step > 0) {
    for (int dense : mlp_only_layers) {
      if (dense == layer) return false;
    }
    return (layer + 1) % decoder_sparse_step == 0;
  }
  return layer >= first_k_dense_replace && layer % moe_layer_freq == 0;
}

int ModelConfig::num_moe_layers() const {
  int count = 0;
  for (int layer = 0; layer < num_hidden_layers; ++layer) count += is_moe_layer(layer) ? 1 : 0;
  return count;
}

double ModelConfig::attention_softmax_scale() const {
  if (!uses_mla()) return 1.0 / std::sqrt(static_cast<double>(head_dim));
  double scale = 1.0 / std::sqrt(static_cast<double>(qk_head_dim()));
  if (rope_scaling.type == RopeScaling::Type::kYarn && rope_scaling.mscale_all_dim != 0.0) {
    const double mscale = YarnMscale(rope_scaling.factor, rope_scaling.mscale_all_dim);
    scale *= mscale * mscale;
  }
  return scale;
}

namespace {

absl::Status ValidateAttention(const ModelConfig& c) {
  if (c.uses_mla()) {
    for (auto [field, value] : std::initializer_list<std::pair<const char*, int>>{
             {"kv_lora_rank", c.kv_lora_rank},
             {"qk_nope_head_dim", c.qk_nope_head_dim},
             {"qk_rope_head_dim", c.qk_rope_head_dim},
             {"v_head_dim", c.v_head_dim}}) {
      RETURN_IF_ERROR(CheckPositive(field, value));
    }
    if (c.qk_rope_head_dim % 2 != 0) {
      return absl::InvalidArgumentError("config: `qk_rope_head_dim` must be even");
    }
    if (c.q_lora_rank < 0) return absl::InvalidArgumentError("config: `q_lora_rank` must be >= 0");
    if (c.attention_bias) {
      return absl::InvalidArgumentError(
          "config: `attention_bias` = true is not supported for multi-head latent attention");
    }
    return absl::OkStatus();
  }
  RETURN_IF_ERROR(CheckPositive("num_key_value_heads", c.num_key_value_heads));
  RETURN_IF_ERROR(CheckPositive("head_dim", c.head_dim));
  if (c.head_dim % 2 != 0) return absl::InvalidArgumentError("config: `head_dim` must be even");
  if (c.num_attention_heads % c.num_key_value_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "config: `num_attention_heads` (", c.num_attention_heads,
        ") must be a multiple of `num_key_value_heads` (", c.num_key_value_heads, ")"));
  }
  return absl::OkStatus();
}

}  // namespace

namespace {

absl::Status ValidateLimits(const ModelConfig& c) {
  for (auto [field, value, limit] : std::initializer_list<std::tuple<const char*, int, int>>{
           {"num_hidden_layers", c.num_hidden_layers, kMaxConfigLayers},
           {"n_routed_experts", c.n_routed_experts, kMaxConfigRoutedExperts},
           {"n_shared_experts", c.n_shared_experts, kMaxConfigRoutedExperts},
           {"num_experts_per_tok", c.num_experts_per_tok, kMaxConfigRoutedExperts},
           {"n_group", c.n_group, kMaxConfigRoutedExperts},
           {"max_position_embeddings", c.max_position_embeddings, kMaxConfigPositions},
           {"vocab_size", c.vocab_size, kMaxConfigVocabulary},
           {"hidden_size", c.hidden_size, kMaxConfigDimension},
           {"intermediate_size", c.intermediate_size, kMaxConfigDimension},
           {"moe_intermediate_size", c.moe_intermediate_size, kMaxConfigDimension},
           {"q_lora_rank", c.q_lora_rank, kMaxConfigDimension},
           {"kv_lora_rank", c.kv_lora_rank, kMaxConfigDimension},
           {"qk_nope_head_dim", c.qk_nope_head_dim, kMaxConfigDimension},
           {"qk_rope_head_dim", c.qk_rope_head_dim, kMaxConfigDimension},
           {"v_head_dim", c.v_head_dim, kMaxConfigDimension},
           {"head_dim", c.head_dim, kMaxConfigDimension},
           {"num_attention_heads", c.num_attention_heads, kMaxConfigHeads},
           {"num_key_value_heads", c.num_key_value_heads, kMaxConfigHeads}}) {
    if (value > limit) {
      return absl::InvalidArgumentError(absl::StrCat("config: `", field, "` = ", value,
                                                     " is beyond what moeserve serves (at most ",
                                                     limit, ")"));
    }
  }
  // Sizes multiplied together below must stay inside int64 and each shared expert's width
  // inside int.
  if (static_cast<int64_t>(c.moe_intermediate_size) * std::max(c.n_shared_experts, 1) >
      kMaxConfigDimension) {
    return absl::InvalidArgumentError(
        "config: `moe_intermediate_size` x `n_shared_experts` is beyond what moeserve serves");
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ValidateModelConfig(const ModelConfig& c) {
  if (auto status = ValidateLimits(c); !status.ok()) return status;
  for (auto [field, value] : std::initializer_list<std::pair<const char*, int>>{
           {"vocab_size", c.vocab_size},
           {"hidden_size", c.hidden_size},
           {"num_hidden_layers", c.num_hidden_layers},
           {"num_attention_heads", c.num_attention_heads},
           {"max_position_embeddings", c.max_position_embeddings},
           {"moe_layer_freq", c.moe_layer_freq}}) {
    RETURN_IF_ERROR(CheckPositive(field, value));
  }
  RETURN_IF_ERROR(ValidateAttention(c));
  if (c.first_k_dense_replace < 0 || c.first_k_dense_replace > c.num_hidden_layers) {
    return absl::InvalidArgumentError(
        "config: `first_k_dense_replace` must be in [0, num_hidden_layers]");
  }
  if (c.decoder_sparse_step < 0) {
    return absl::InvalidArgumentError("config: `decoder_sparse_step` must be >= 0");
  }
  for (int layer : c.mlp_only_layers) {
    if (layer < 0 || layer >= c.num_hidden_layers) {
      return absl::InvalidArgumentError(absl::StrCat("config: `mlp_only_layers` names layer ",
                                                     layer, ", outside [0, num_hidden_layers)"));
    }
  }
  if (c.num_moe_layers() < c.num_hidden_layers) {
    RETURN_IF_ERROR(CheckPositive("intermediate_size", c.intermediate_size));
  }
  if (c.n_routed_experts < 0) {
    return absl::InvalidArgumentError("config: the number of routed experts must be >= 0");
  }
  if (c.n_routed_experts > 0) {
    RETURN_IF_ERROR(CheckPositive("moe_intermediate_size", c.moe_intermediate_size));
    RETURN_IF_ERROR(CheckPositive("num_experts_per_tok", c.num_experts_per_tok));
    RETURN_IF_ERROR(CheckPositive("n_group", c.n_group));
    if (c.num_experts_per_tok > c.n_routed_experts) {
      return absl::InvalidArgumentError("config: `num_experts_per_tok` exceeds `n_routed_experts`");
    }
    if (c.n_routed_experts % c.n_group != 0) {
      return absl::InvalidArgumentError("config: `n_routed_experts` must divide by `n_group`");
    }
    if (c.topk_group < 1 || c.topk_group > c.n_group) {
      return absl::InvalidArgumentError("config: `topk_group` must be in [1, n_group]");
    }
    if (c.topk_method != TopKMethod::kGreedy &&
        c.topk_group * (c.n_routed_experts / c.n_group) < c.num_experts_per_tok) {
      return absl::InvalidArgumentError(
          "config: the chosen groups hold fewer experts than `num_experts_per_tok`");
    }
    if (c.topk_method == TopKMethod::kNoAuxTc && c.n_routed_experts / c.n_group < 2) {
      return absl::InvalidArgumentError(
          "config: noaux_tc group scores need at least 2 experts per group");
    }
  }
  if (c.n_shared_experts < 0) {
    return absl::InvalidArgumentError("config: `n_shared_experts` must be >= 0");
  }
  if (c.rope_scaling.type == RopeScaling::Type::kYarn &&
      (c.rope_scaling.factor <= 0 || c.rope_scaling.original_max_position_embeddings <= 0)) {
    return absl::InvalidArgumentError(
        "config: yarn rope needs `factor` > 0 and `original_max_position_embeddings` > 0");
  }
  if (c.bos_token_id < 0 || c.bos_token_id >= c.vocab_size || c.eos_token_id < 0 ||
      c.eos_token_id >= c.vocab_size) {
    return absl::InvalidArgumentError("config: bos/eos token ids must be < vocab_size");
  }
  if (!(c.rope_theta > 0) || !std::isfinite(c.rope_theta)) {
    return absl::InvalidArgumentError("config: `rope_theta` must be a finite number > 0");
  }
  if (!(c.rms_norm_eps > 0) || !std::isfinite(c.rms_norm_eps) ||
      !std::isfinite(c.routed_scaling_factor)) {
    return absl::InvalidArgumentError("config: `rms_norm_eps` and scaling factors must be finite");
  }
  return absl::OkStatus();
}

}  // namespace moeserve::engine
