// ParseModelConfig on Hugging Face config.json objects (DeepSeek-V3 and V2 shapes, both rope
// spellings), its error messages, and the built-in model configs.
#include <cmath>
#include <string>

#include "engine/model/architecture.h"
#include "engine/model/builtin_models.h"
#include "engine/model/hf_config.h"
#include "engine/model/model_config.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace moeserve::engine {
namespace {

using ::testing::HasSubstr;

// DeepSeek-V3's published config.json (the keys moeserve reads, plus some it ignores).
nlohmann::json DeepSeekV3Json() {
  return nlohmann::json::parse(R"({
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "first_k_dense_replace": 3,
    "moe_layer_freq": 1,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "num_experts_per_tok": 8,
    "n_group": 8,
    "topk_group": 4,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "norm_topk_prob": true,
    "routed_scaling_factor": 2.5,
    "max_position_embeddings": 163840,
    "rope_theta": 10000,
    "rope_scaling": {
      "beta_fast": 32,
      "beta_slow": 1,
      "factor": 40,
      "mscale": 1.0,
      "mscale_all_dim": 1.0,
      "original_max_position_embeddings": 4096,
      "type": "yarn"
    },
    "rms_norm_eps": 1e-06,
    "tie_word_embeddings": false,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "hidden_act": "silu",
    "attention_bias": false,
    "num_nextn_predict_layers": 1,
    "torch_dtype": "bfloat16"
  })");
}

void ExpectDeepSeekV3Shape(const ModelConfig& c) {
  EXPECT_EQ(c.model_type, "deepseek_v3");
  EXPECT_EQ(c.vocab_size, 129280);
  EXPECT_EQ(c.hidden_size, 7168);
  EXPECT_EQ(c.intermediate_size, 18432);
  EXPECT_EQ(c.moe_intermediate_size, 2048);
  EXPECT_EQ(c.num_hidden_layers, 61);
  EXPECT_EQ(c.first_k_dense_replace, 3);
  EXPECT_EQ(c.num_moe_layers(), 58);
  EXPECT_FALSE(c.is_moe_layer(2));
  EXPECT_TRUE(c.is_moe_layer(3));
  EXPECT_EQ(c.num_attention_heads, 128);
  EXPECT_EQ(c.q_lora_rank, 1536);
  EXPECT_EQ(c.kv_lora_rank, 512);
  EXPECT_EQ(c.qk_nope_head_dim, 128);
  EXPECT_EQ(c.qk_rope_head_dim, 64);
  EXPECT_EQ(c.qk_head_dim(), 192);
  EXPECT_EQ(c.v_head_dim, 128);
  EXPECT_EQ(c.n_routed_experts, 256);
  EXPECT_EQ(c.n_shared_experts, 1);
  EXPECT_EQ(c.num_experts_per_tok, 8);
  EXPECT_EQ(c.n_group, 8);
  EXPECT_EQ(c.topk_group, 4);
  EXPECT_EQ(c.scoring_func, ScoringFunction::kSigmoid);
  EXPECT_EQ(c.topk_method, TopKMethod::kNoAuxTc);
  EXPECT_TRUE(c.norm_topk_prob);
  EXPECT_DOUBLE_EQ(c.routed_scaling_factor, 2.5);
  EXPECT_EQ(c.max_position_embeddings, 163840);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-6);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_EQ(c.bos_token_id, 0);
  EXPECT_EQ(c.eos_token_id, 1);
  EXPECT_EQ(c.rope_scaling.type, RopeScaling::Type::kYarn);
  EXPECT_DOUBLE_EQ(c.rope_scaling.factor, 40.0);
  EXPECT_EQ(c.rope_scaling.original_max_position_embeddings, 4096);
  EXPECT_DOUBLE_EQ(c.rope_scaling.beta_fast, 32.0);
  EXPECT_DOUBLE_EQ(c.rope_scaling.beta_slow, 1.0);
  EXPECT_DOUBLE_EQ(c.rope_scaling.mscale, 1.0);
  EXPECT_DOUBLE_EQ(c.rope_scaling.mscale_all_dim, 1.0);
  // 1/sqrt(192) * (0.1 ln 40 + 1)^2.
  EXPECT_NEAR(c.attention_softmax_scale(), 0.1352337788608801, 1e-12);
}

TEST(ParseModelConfig, DeepSeekV3WithRopeScaling) {
  absl::StatusOr<ModelConfig> config = ParseModelConfig(DeepSeekV3Json(), "DeepSeek-V3");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->name, "DeepSeek-V3");
  EXPECT_DOUBLE_EQ(config->rope_theta, 10000.0);
  ExpectDeepSeekV3Shape(*config);
}

TEST(ParseModelConfig, DeepSeekV3WithRopeParametersAndThetaInside) {
  nlohmann::json json = DeepSeekV3Json();
  nlohmann::json rope = json["rope_scaling"];
  rope.erase("type");
  rope["rope_type"] = "yarn";
  rope["rope_theta"] = 50000.0;
  json.erase("rope_scaling");
  json.erase("rope_theta");
  json["rope_parameters"] = rope;
  absl::StatusOr<ModelConfig> config = ParseModelConfig(json, "v3-new-spelling");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_DOUBLE_EQ(config->rope_theta, 50000.0);
  ExpectDeepSeekV3Shape(*config);
}

TEST(ParseModelConfig, DefaultRopeParametersOnlySetTheta) {
  nlohmann::json json = DeepSeekV3Json();
  json.erase("rope_scaling");
  json.erase("rope_theta");
  json["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 123456.0}};
  absl::StatusOr<ModelConfig> config = ParseModelConfig(json, "v3");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_DOUBLE_EQ(config->rope_theta, 123456.0);
  EXPECT_EQ(config->rope_scaling.type, RopeScaling::Type::kNone);
  EXPECT_NEAR(config->attention_softmax_scale(), 1.0 / std::sqrt(192.0), 1e-15);
}

TEST(ParseModelConfig, NullRopeScalingIsPlainRope) {
  nlohmann::json json = DeepSeekV3Json();
  json["rope_scaling"] = nullptr;
  absl::StatusOr<ModelConfig> config = ParseModelConfig(json, "v3");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->rope_scaling.type, RopeScaling::Type::kNone);
}

TEST(ParseModelConfig, DeepSeekV2LiteStyle) {
  // DeepSeek-V2-Lite: no q-LoRA (null), softmax scoring, greedy top-k, no normalization.
  nlohmann::json json = DeepSeekV3Json();
  json["model_type"] = "deepseek_v2";
  json["q_lora_rank"] = nullptr;
  json["n_routed_experts"] = 64;
  json["num_experts_per_tok"] = 6;
  json["n_group"] = 1;
  json["topk_group"] = 1;
  json["norm_topk_prob"] = false;
  json["routed_scaling_factor"] = 1.0;
  json.erase("scoring_func");
  json.erase("topk_method");
  absl::StatusOr<ModelConfig> config = ParseModelConfig(json, "v2-lite");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->q_lora_rank, 0);
  EXPECT_EQ(config->scoring_func, ScoringFunction::kSoftmax);
  EXPECT_EQ(config->topk_method, TopKMethod::kGreedy);
  json["topk_method"] = "group_limited_greedy";
  json["n_group"] = 8;
  json["topk_group"] = 3;
  config = ParseModelConfig(json, "v2");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->topk_method, TopKMethod::kGroupLimitedGreedy);
}

absl::Status ParseError(const nlohmann::json& json) {
  absl::StatusOr<ModelConfig> config = ParseModelConfig(json, "bad");
  EXPECT_FALSE(config.ok()) << json.dump();
  return config.ok() ? absl::OkStatus() : config.status();
}

TEST(ParseModelConfig, MissingRequiredFieldIsNamed) {
  for (const char* field : {"model_type", "vocab_size", "hidden_size", "num_hidden_layers",
                            "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim",
                            "qk_rope_head_dim", "v_head_dim", "max_position_embeddings"}) {
    nlohmann::json json = DeepSeekV3Json();
    json.erase(field);
    const absl::Status status = ParseError(json);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << field;
    EXPECT_THAT(status.message(), HasSubstr(absl::StrCat("missing `", field, "`")));
  }
}

TEST(ParseModelConfig, WrongTypeIsNamed) {
  nlohmann::json json = DeepSeekV3Json();
  json["hidden_size"] = "7168";
  absl::Status status = ParseError(json);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("`hidden_size` has the wrong type"));

  json = DeepSeekV3Json();
  json["norm_topk_prob"] = "yes";
  EXPECT_THAT(ParseError(json).message(), HasSubstr("`norm_topk_prob`"));

  json = DeepSeekV3Json();
  json["model_type"] = 3;
  EXPECT_THAT(ParseError(json).message(), HasSubstr("`model_type`"));
}

TEST(ParseModelConfig, UnsupportedModelTypeListsSupportedOnes) {
  nlohmann::json json = DeepSeekV3Json();
  json["model_type"] = "llama";
  const absl::Status status = ParseError(json);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("unsupported model_type `llama`"));
  EXPECT_THAT(status.message(), HasSubstr("deepseek_v3"));
}

TEST(ParseModelConfig, ExpertsMustDivideIntoGroups) {
  nlohmann::json json = DeepSeekV3Json();
  json["n_routed_experts"] = 250;  // not a multiple of n_group = 8
  const absl::Status status = ParseError(json);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("n_group"));
}

TEST(ParseModelConfig, OtherInvalidValues) {
  struct Case {
    const char* key;
    nlohmann::json value;
    const char* message;
  };
  for (const Case& c :
       {Case{"scoring_func", "relu", "scoring_func"}, Case{"topk_method", "random", "topk_method"},
        Case{"qk_rope_head_dim", 63, "qk_rope_head_dim"}, Case{"topk_group", 9, "topk_group"},
        Case{"num_experts_per_tok", 300, "num_experts_per_tok"},
        Case{"hidden_size", 0, "hidden_size"}, Case{"num_hidden_layers", -1, "num_hidden_layers"},
        Case{"first_k_dense_replace", 62, "first_k_dense_replace"},
        Case{"eos_token_id", 129280, "eos"}}) {
    nlohmann::json json = DeepSeekV3Json();
    json[c.key] = c.value;
    const absl::Status status = ParseError(json);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << c.key;
    EXPECT_THAT(status.message(), HasSubstr(c.message)) << c.key;
  }
  nlohmann::json json = DeepSeekV3Json();
  json["rope_scaling"]["type"] = "dynamic";
  EXPECT_THAT(ParseError(json).message(), HasSubstr("unsupported rope type `dynamic`"));
  EXPECT_THAT(ParseError(nlohmann::json::array()).message(), HasSubstr("JSON object"));
}

TEST(ParseModelConfig, OutOfRangeIntegersAreRejected) {
  // Regression: get<int>() used to narrow silently, so 2^32 + 256 was read as 256 and an
  // absurd config.json was accepted as a different model. Values outside int's range (and
  // non-integers such as 1e30) must be refused.
  nlohmann::json json = DeepSeekV3Json();
  json["hidden_size"] = 4294967552ull;  // 2^32 + 256
  const absl::Status status = ParseError(json);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("hidden_size"));
  json["hidden_size"] = 1e30;
  EXPECT_THAT(ParseError(json).message(), HasSubstr("hidden_size"));
}

TEST(ModelConfigToJson, RoundTripsThroughTheParser) {
  for (const std::string& name : BuiltinModelNames()) {
    absl::StatusOr<ModelConfig> builtin = BuiltinModelConfig(name);
    ASSERT_TRUE(builtin.ok()) << builtin.status();
    absl::StatusOr<ModelConfig> parsed = ParseModelConfig(ModelConfigToJson(*builtin), name);
    ASSERT_TRUE(parsed.ok()) << name << ": " << parsed.status();
    EXPECT_EQ(parsed->model_type, builtin->model_type) << name;
    EXPECT_EQ(parsed->q_lora_rank, builtin->q_lora_rank) << name;
    EXPECT_EQ(parsed->scoring_func, builtin->scoring_func) << name;
    EXPECT_EQ(parsed->topk_method, builtin->topk_method) << name;
    EXPECT_EQ(parsed->norm_topk_prob, builtin->norm_topk_prob) << name;
    EXPECT_EQ(parsed->rope_scaling.type, builtin->rope_scaling.type) << name;
    EXPECT_DOUBLE_EQ(parsed->attention_softmax_scale(), builtin->attention_softmax_scale()) << name;
    EXPECT_EQ(parsed->n_routed_experts, builtin->n_routed_experts) << name;
    EXPECT_EQ(parsed->vocab_size, builtin->vocab_size) << name;
  }
}

TEST(BuiltinModelConfig, KnownModelsAreValid) {
  for (const std::string& name : BuiltinModelNames()) {
    absl::StatusOr<ModelConfig> config = BuiltinModelConfig(name);
    ASSERT_TRUE(config.ok()) << name << ": " << config.status();
    EXPECT_EQ(config->name, name);
    EXPECT_TRUE(ValidateModelConfig(*config).ok()) << name;
  }
  absl::StatusOr<ModelConfig> tiny = BuiltinModelConfig("builtin:tiny");
  ASSERT_TRUE(tiny.ok());
  // DeepSeek-V3's architecture scaled down: q-LoRA, YaRN, sigmoid + noaux_tc, shared expert.
  EXPECT_GT(tiny->q_lora_rank, 0);
  EXPECT_EQ(tiny->rope_scaling.type, RopeScaling::Type::kYarn);
  EXPECT_EQ(tiny->topk_method, TopKMethod::kNoAuxTc);
  EXPECT_EQ(tiny->n_shared_experts, 1);
  EXPECT_GE(tiny->first_k_dense_replace, 1);
  EXPECT_GT(tiny->num_moe_layers(), 0);
}

TEST(BuiltinModelConfig, UnknownNameListsAvailableOnes) {
  absl::StatusOr<ModelConfig> config = BuiltinModelConfig("builtin:huge");
  ASSERT_FALSE(config.ok());
  EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(config.status().message(), HasSubstr("builtin:huge"));
  for (const std::string& name : BuiltinModelNames()) {
    EXPECT_THAT(config.status().message(), HasSubstr(name));
  }
}

}  // namespace
}  // namespace moeserve::engine

namespace moeserve::engine {
namespace {

TEST(Architecture, EveryFamilyIsFoundByItsModelTypeAndNothingElse) {
  for (const char* type : {"deepseek_v3", "deepseek_v2", "qwen3_moe", "mixtral"}) {
    const Architecture* architecture = FindArchitecture(type);
    ASSERT_NE(architecture, nullptr) << type;
    EXPECT_STREQ(architecture->model_type, type);
  }
  EXPECT_EQ(FindArchitecture("llama"), nullptr);
  EXPECT_EQ(FindArchitecture(""), nullptr);
  EXPECT_EQ(SupportedModelTypes(), "deepseek_v3, deepseek_v2, qwen3_moe, mixtral");
  EXPECT_TRUE(FindArchitecture("deepseek_v3")->runs_on_gpu);
  EXPECT_TRUE(FindArchitecture("qwen3_moe")->runs_on_gpu);
  EXPECT_TRUE(FindArchitecture("mixtral")->runs_on_gpu);
  EXPECT_TRUE(FindArchitecture("mixtral")->mixtral_tensor_names);
}

TEST(Architecture, RoutingRulesCarryEachFamilysQuirks) {
  // DeepSeek-V3: sigmoid, group scores of the two best, renormalize then scale.
  ModelConfig v3 = *BuiltinModelConfig("builtin:tiny");
  RoutingRule rule = RoutingRuleOf(v3);
  EXPECT_TRUE(rule.sigmoid);
  EXPECT_TRUE(rule.group_limited);
  EXPECT_EQ(rule.num_groups, 8);
  EXPECT_EQ(rule.topk_groups, 4);
  EXPECT_TRUE(rule.group_score_top2_sum);
  EXPECT_TRUE(rule.normalize);
  EXPECT_FLOAT_EQ(rule.scaling, 2.5f);
  // DeepSeek-V2 without renormalization: softmax, the group's best score, scaled instead.
  ModelConfig v2 = *BuiltinModelConfig("builtin:tiny-v2");
  v2.routed_scaling_factor = 16;
  rule = RoutingRuleOf(v2);
  EXPECT_FALSE(rule.sigmoid);
  EXPECT_FALSE(rule.group_score_top2_sum);
  EXPECT_FALSE(rule.normalize);
  EXPECT_FLOAT_EQ(rule.scaling, 16.0f);
  // DeepSeek-V2 renormalizing one expert: it does not (a single weight stays a score).
  v2.norm_topk_prob = true;
  v2.num_experts_per_tok = 1;
  EXPECT_FALSE(RoutingRuleOf(v2).normalize);
  v2.num_experts_per_tok = 2;
  rule = RoutingRuleOf(v2);
  EXPECT_TRUE(rule.normalize);
  EXPECT_FLOAT_EQ(rule.scaling, 1.0f) << "V2 scales only instead of renormalizing";
  // Qwen3-MoE with one expert per token still renormalizes when asked.
  ModelConfig qwen = v3;
  qwen.model_type = "qwen3_moe";
  qwen.num_experts_per_tok = 1;
  qwen.topk_method = TopKMethod::kGreedy;
  qwen.routed_scaling_factor = 1.0;
  rule = RoutingRuleOf(qwen);
  EXPECT_TRUE(rule.normalize);
  EXPECT_FALSE(rule.group_limited);
  EXPECT_EQ(rule.num_groups, 1);
  EXPECT_FLOAT_EQ(rule.scaling, 1.0f);
}

}  // namespace
}  // namespace moeserve::engine
