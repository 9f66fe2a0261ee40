#include "engine/model/hf_config.h"

#include <cmath>
#include <limits>
#include <type_traits>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "engine/base/status_macros.h"
#include "engine/model/architecture.h"
#include "nlohmann/json.hpp"

namespace moeserve::engine {
namespace {

template <typename T>
absl::Status ReadField(const nlohmann::json& json, const char* key, T* out, bool required) {
  auto it = json.find(key);
  if (it == json.end() || it->is_null()) {
    if (required) return absl::InvalidArgumentError(absl::StrCat("config: missing `", key, "`"));
    return absl::OkStatus();
  }
  if constexpr (std::is_same_v<T, int>) {
    // get<int>() would narrow silently: 2^32 + 256 must not become 256.
    if (!it->is_number_integer() || it->get<int64_t>() < std::numeric_limits<int>::min() ||
        it->get<int64_t>() > std::numeric_limits<int>::max()) {
      return absl::InvalidArgumentError(
          absl::StrCat("config: `", key,
                       "` has the wrong type: expected an integer in the int32 "
                       "range, got ",
                       it->dump()));
    }
  }
  try {
    *out = it->get<T>();
  } catch (const nlohmann::json::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("config: `", key, "` has the wrong type: ", it->dump()));
  }
  return absl::OkStatus();
}

absl::Status ParseRopeScaling(const nlohmann::json& json, ModelConfig& config) {
  // Newer exports spell it `rope_parameters` (with rope_theta inside); originals `rope_scaling`.
  const nlohmann::json* rope = nullptr;
  for (const char* key : {"rope_scaling", "rope_parameters"}) {
    auto it = json.find(key);
    if (it != json.end() && it->is_object()) rope = &*it;
  }
  if (rope == nullptr) return absl::OkStatus();
  if (auto theta = rope->find("rope_theta"); theta != rope->end() && theta->is_number()) {
    config.rope_theta = theta->get<double>();
  }
  std::string type = "default";
  if (auto it = rope->find("rope_type"); it != rope->end() && it->is_string()) {
    type = it->get<std::string>();
  } else if (auto it2 = rope->find("type"); it2 != rope->end() && it2->is_string()) {
    type = it2->get<std::string>();
  }
  if (type == "default") return absl::OkStatus();
  if (type != "yarn") {
    return absl::InvalidArgumentError(
        absl::StrCat("config: unsupported rope type `", type, "` (supported: default, yarn)"));
  }
  RopeScaling& yarn = config.rope_scaling;
  yarn.type = RopeScaling::Type::kYarn;
  auto number = [&](const char* key, double* out) {
    if (auto it = rope->find(key); it != rope->end() && it->is_number()) *out = it->get<double>();
  };
  number("factor", &yarn.factor);
  number("beta_fast", &yarn.beta_fast);
  number("beta_slow", &yarn.beta_slow);
  number("mscale", &yarn.mscale);
  number("mscale_all_dim", &yarn.mscale_all_dim);
  double original = config.max_position_embeddings;
  number("original_max_position_embeddings", &original);
  // Converting a double outside int's range is undefined; refuse it (and non-finite factors).
  if (!(original >= 1 && original <= kMaxConfigPositions)) {
    return absl::InvalidArgumentError(
        absl::StrCat("config: rope `original_max_position_embeddings` must be in [1, ",
                     kMaxConfigPositions, "]"));
  }
  for (double value :
       {yarn.factor, yarn.beta_fast, yarn.beta_slow, yarn.mscale, yarn.mscale_all_dim}) {
    if (!std::isfinite(value)) {
      return absl::InvalidArgumentError("config: rope scaling values must be finite numbers");
    }
  }
  yarn.original_max_position_embeddings = static_cast<int>(original);
  return absl::OkStatus();
}

// Reads a token id that may be absent, null, an integer or (as some exports write) a list whose
// first entry is used. Absent or null leaves `out` unchanged.
absl::Status ReadTokenId(const nlohmann::json& json, const char* key, int* out) {
  auto it = json.find(key);
  if (it == json.end() || it->is_null()) return absl::OkStatus();
  const nlohmann::json* value = &*it;
  if (value->is_array()) {
    if (value->empty()) return absl::OkStatus();
    value = &(*value)[0];
  }
  nlohmann::json single = {{key, *value}};
  return ReadField(single, key, out, true);
}

// The `hidden_act` every supported model uses; anything else would silently compute another
// function.
absl::Status CheckActivation(const nlohmann::json& json) {
  auto it = json.find("hidden_act");
  if (it == json.end() || it->is_null()) return absl::OkStatus();
  if (it->is_string() && it->get<std::string>() == "silu") return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("config: unsupported `hidden_act` ", it->dump(), " (supported: \"silu\")"));
}

// Fields shared by every architecture.
absl::Status ReadCommonFields(const nlohmann::json& json, ModelConfig& c) {
  absl::Status status;
  auto read = [&](const char* key, auto* out, bool required) {
    if (status.ok()) status = ReadField(json, key, out, required);
  };
  read("vocab_size", &c.vocab_size, true);
  read("hidden_size", &c.hidden_size, true);
  read("intermediate_size", &c.intermediate_size, false);
  read("num_hidden_layers", &c.num_hidden_layers, true);
  read("num_attention_heads", &c.num_attention_heads, true);
  read("max_position_embeddings", &c.max_position_embeddings, true);
  read("rope_theta", &c.rope_theta, false);
  read("rms_norm_eps", &c.rms_norm_eps, false);
  read("tie_word_embeddings", &c.tie_word_embeddings, false);
  if (status.ok()) status = ReadTokenId(json, "bos_token_id", &c.bos_token_id);
  if (status.ok()) status = ReadTokenId(json, "eos_token_id", &c.eos_token_id);
  if (status.ok()) status = CheckActivation(json);
  return status;
}

absl::Status ReadDeepSeekFields(const nlohmann::json& json, ModelConfig& c) {
  const Architecture& architecture = ArchitectureOf(c);
  c.attention_type = architecture.attention;
  c.scoring_func = architecture.default_scoring;
  c.topk_method = architecture.default_topk;
  absl::Status status;
  auto read = [&](const char* key, auto* out, bool required) {
    if (status.ok()) status = ReadField(json, key, out, required);
  };
  read("moe_intermediate_size", &c.moe_intermediate_size, false);
  read("first_k_dense_replace", &c.first_k_dense_replace, false);
  read("moe_layer_freq", &c.moe_layer_freq, false);
  read("q_lora_rank", &c.q_lora_rank, false);
  read("kv_lora_rank", &c.kv_lora_rank, true);
  read("qk_nope_head_dim", &c.qk_nope_head_dim, true);
  read("qk_rope_head_dim", &c.qk_rope_head_dim, true);
  read("v_head_dim", &c.v_head_dim, true);
  read("n_routed_experts", &c.n_routed_experts, false);
  read("n_shared_experts", &c.n_shared_experts, false);
  read("num_experts_per_tok", &c.num_experts_per_tok, false);
  read("n_group", &c.n_group, false);
  read("topk_group", &c.topk_group, false);
  read("norm_topk_prob", &c.norm_topk_prob, false);
  read("routed_scaling_factor", &c.routed_scaling_factor, false);
  read("attention_bias", &c.attention_bias, false);
  read("rope_interleave", &c.rope_interleaved, false);
  if (!status.ok()) return status;
  std::string scoring, topk_method;
  read("scoring_func", &scoring, false);
  read("topk_method", &topk_method, false);
  if (!status.ok()) return status;
  if (scoring == "sigmoid")
    c.scoring_func = ScoringFunction::kSigmoid;
  else if (scoring == "softmax")
    c.scoring_func = ScoringFunction::kSoftmax;
  else if (!scoring.empty())
    return absl::InvalidArgumentError(
        absl::StrCat("config: unsupported scoring_func `", scoring, "`"));
  if (topk_method == "noaux_tc")
    c.topk_method = TopKMethod::kNoAuxTc;
  else if (topk_method == "greedy")
    c.topk_method = TopKMethod::kGreedy;
  else if (topk_method == "group_limited_greedy")
    c.topk_method = TopKMethod::kGroupLimitedGreedy;
  else if (!topk_method.empty())
    return absl::InvalidArgumentError(
        absl::StrCat("config: unsupported topk_method `", topk_method, "`"));
  return absl::OkStatus();
}

// Reads a required integer that exports spell two ways. Both present must agree.
absl::Status ReadEitherSpelling(const nlohmann::json& json, const char* key, const char* other,
                                int* out) {
  const bool has_key = json.contains(key) && !json[key].is_null();
  const bool has_other = json.contains(other) && !json[other].is_null();
  if (!has_key && !has_other) {
    return absl::InvalidArgumentError(
        absl::StrCat("config: missing `", key, "` (or `", other, "`)"));
  }
  int first = 0, second = 0;
  if (has_key) {
    RETURN_IF_ERROR(ReadField(json, key, &first, true));
  }
  if (has_other) {
    RETURN_IF_ERROR(ReadField(json, other, &second, true));
  }
  if (has_key && has_other && first != second) {
    return absl::InvalidArgumentError(absl::StrCat("config: `", key, "` (", first, ") and `", other,
                                                   "` (", second, ") disagree"));
  }
  *out = has_key ? first : second;
  return absl::OkStatus();
}

// Qwen3-MoE and Mixtral: grouped-query attention, softmax top-k routing, no shared experts.
absl::Status ReadGroupedQueryFields(const nlohmann::json& json, ModelConfig& c) {
  const Architecture& architecture = ArchitectureOf(c);
  const bool qwen = architecture.family == ModelFamily::kQwen3Moe;
  c.attention_type = architecture.attention;
  c.rope_interleaved = false;
  c.qk_norm = architecture.qk_norm;
  c.scoring_func = architecture.default_scoring;
  c.topk_method = architecture.default_topk;
  c.n_group = 1;
  c.topk_group = 1;
  c.routed_scaling_factor = 1.0;
  c.num_key_value_heads = c.num_attention_heads;
  c.head_dim = c.hidden_size / c.num_attention_heads;
  absl::Status status;
  auto read = [&](const char* key, auto* out, bool required) {
    if (status.ok()) status = ReadField(json, key, out, required);
  };
  read("num_key_value_heads", &c.num_key_value_heads, false);
  read("head_dim", &c.head_dim, false);
  read("num_experts_per_tok", &c.num_experts_per_tok, true);
  read("attention_bias", &c.attention_bias, false);
  if (qwen) {
    c.norm_topk_prob = false;  // Qwen3MoeConfig's default
    c.decoder_sparse_step = 1;
    // Qwen's original configs say `num_experts`; transformers 5 writes `num_local_experts`.
    if (status.ok())
      status = ReadEitherSpelling(json, "num_experts", "num_local_experts", &c.n_routed_experts);
    read("moe_intermediate_size", &c.moe_intermediate_size, true);
    read("norm_topk_prob", &c.norm_topk_prob, false);
    read("decoder_sparse_step", &c.decoder_sparse_step, false);
    read("mlp_only_layers", &c.mlp_only_layers, false);
    if (status.ok() && c.decoder_sparse_step <= 0) {
      return absl::InvalidArgumentError("config: `decoder_sparse_step` must be > 0");
    }
  } else {
    // Mixtral: every layer is MoE; each expert's size is `intermediate_size`; the top-k
    // weights are always renormalized.
    c.norm_topk_prob = true;
    read("num_local_experts", &c.n_routed_experts, true);
    if (status.ok()) status = CheckPositive("intermediate_size", c.intermediate_size);
    c.moe_intermediate_size = c.intermediate_size;
  }
  if (!status.ok()) return status;
  // moeserve attends over the whole context. With a sliding window that is exact only up to the
  // window's length, so the context is capped there.
  bool sliding = !qwen;
  if (qwen) read("use_sliding_window", &sliding, false);
  int window = 0;
  if (sliding) read("sliding_window", &window, false);
  if (!status.ok()) return status;
  if (window > 0 && window < c.max_position_embeddings) c.max_position_embeddings = window;
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ModelConfig> ParseModelConfig(const nlohmann::json& json, std::string name) {
  if (!json.is_object()) return absl::InvalidArgumentError("config: expected a JSON object");
  ModelConfig c;
  c.name = std::move(name);
  RETURN_IF_ERROR(ReadField(json, "model_type", &c.model_type, true));
  const Architecture* architecture = FindArchitecture(c.model_type);
  if (architecture == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("config: unsupported model_type `", c.model_type,
                                                   "` (supported: ", SupportedModelTypes(), ")"));
  }
  const bool deepseek = architecture->attention == AttentionType::kMultiHeadLatent;
  RETURN_IF_ERROR(ReadCommonFields(json, c));
  RETURN_IF_ERROR(ParseRopeScaling(json, c));
  if (deepseek) {
    RETURN_IF_ERROR(ReadDeepSeekFields(json, c));
  } else {
    RETURN_IF_ERROR(CheckPositive("num_attention_heads", c.num_attention_heads));
    RETURN_IF_ERROR(ReadGroupedQueryFields(json, c));
  }
  RETURN_IF_ERROR(ValidateModelConfig(c));
  return c;
}

namespace {

nlohmann::json RopeScalingJson(const ModelConfig& c) {
  return {
      {"type", "yarn"},
      {"rope_type", "yarn"},
      {"factor", c.rope_scaling.factor},
      {"original_max_position_embeddings", c.rope_scaling.original_max_position_embeddings},
      {"beta_fast", c.rope_scaling.beta_fast},
      {"beta_slow", c.rope_scaling.beta_slow},
      {"mscale", c.rope_scaling.mscale},
      {"mscale_all_dim", c.rope_scaling.mscale_all_dim},
  };
}

nlohmann::json GroupedQueryConfigJson(const ModelConfig& c) {
  const Architecture& architecture = ArchitectureOf(c);
  const bool qwen = architecture.family == ModelFamily::kQwen3Moe;
  nlohmann::json json = {
      {"model_type", c.model_type},
      {"architectures", {architecture.hf_class}},
      {"vocab_size", c.vocab_size},
      {"hidden_size", c.hidden_size},
      {"num_hidden_layers", c.num_hidden_layers},
      {"num_attention_heads", c.num_attention_heads},
      {"num_key_value_heads", c.num_key_value_heads},
      {"head_dim", c.head_dim},
      {"num_experts_per_tok", c.num_experts_per_tok},
      {"attention_bias", c.attention_bias},
      {"max_position_embeddings", c.max_position_embeddings},
      {"rope_theta", c.rope_theta},
      {"rms_norm_eps", c.rms_norm_eps},
      {"tie_word_embeddings", c.tie_word_embeddings},
      {"bos_token_id", c.bos_token_id},
      {"eos_token_id", c.eos_token_id},
      {"hidden_act", "silu"},
      {"torch_dtype", "float32"},
  };
  if (qwen) {
    json["intermediate_size"] = c.intermediate_size;
    json["moe_intermediate_size"] = c.moe_intermediate_size;
    json["num_experts"] = c.n_routed_experts;
    json["norm_topk_prob"] = c.norm_topk_prob;
    json["decoder_sparse_step"] = c.decoder_sparse_step;
    json["mlp_only_layers"] = c.mlp_only_layers;
    json["use_sliding_window"] = false;
  } else {
    json["intermediate_size"] = c.moe_intermediate_size;
    json["num_local_experts"] = c.n_routed_experts;
    json["sliding_window"] = nullptr;
  }
  if (c.rope_scaling.type == RopeScaling::Type::kYarn) json["rope_scaling"] = RopeScalingJson(c);
  return json;
}

}  // namespace

nlohmann::json ModelConfigToJson(const ModelConfig& c) {
  if (!c.uses_mla()) return GroupedQueryConfigJson(c);
  nlohmann::json json = {
      {"model_type", c.model_type},
      {"architectures", {ArchitectureOf(c).hf_class}},
      {"vocab_size", c.vocab_size},
      {"hidden_size", c.hidden_size},
      {"intermediate_size", c.intermediate_size},
      {"moe_intermediate_size", c.moe_intermediate_size},
      {"num_hidden_layers", c.num_hidden_layers},
      {"first_k_dense_replace", c.first_k_dense_replace},
      {"moe_layer_freq", c.moe_layer_freq},
      {"num_attention_heads", c.num_attention_heads},
      {"num_key_value_heads", c.num_attention_heads},
      {"q_lora_rank", c.q_lora_rank > 0 ? nlohmann::json(c.q_lora_rank) : nlohmann::json()},
      {"kv_lora_rank", c.kv_lora_rank},
      {"qk_nope_head_dim", c.qk_nope_head_dim},
      {"qk_rope_head_dim", c.qk_rope_head_dim},
      {"v_head_dim", c.v_head_dim},
      {"n_routed_experts", c.n_routed_experts},
      {"n_shared_experts", c.n_shared_experts},
      {"num_experts_per_tok", c.num_experts_per_tok},
      {"n_group", c.n_group},
      {"topk_group", c.topk_group},
      {"scoring_func", c.scoring_func == ScoringFunction::kSigmoid ? "sigmoid" : "softmax"},
      {"topk_method", c.topk_method == TopKMethod::kNoAuxTc  ? "noaux_tc"
                      : c.topk_method == TopKMethod::kGreedy ? "greedy"
                                                             : "group_limited_greedy"},
      {"norm_topk_prob", c.norm_topk_prob},
      {"routed_scaling_factor", c.routed_scaling_factor},
      {"max_position_embeddings", c.max_position_embeddings},
      {"rope_theta", c.rope_theta},
      {"rms_norm_eps", c.rms_norm_eps},
      {"tie_word_embeddings", c.tie_word_embeddings},
      {"bos_token_id", c.bos_token_id},
      {"eos_token_id", c.eos_token_id},
      {"attention_bias", false},
      {"hidden_act", "silu"},
      {"torch_dtype", "float32"},
      {"rope_interleave", c.rope_interleaved},
  };
  if (c.rope_scaling.type == RopeScaling::Type::kYarn) {
    json["rope_scaling"] = RopeScalingJson(c);
  }
  return json;
}

}  // namespace moeserve::engine
