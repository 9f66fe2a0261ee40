// `moeserve plan memory`: parameter counts and bytes of the published configs in
// tests/fixtures/configs/ (DeepSeek-V3, DeepSeek-V2, Qwen3-235B-A22B, Qwen3-30B-A3B, Mixtral
// 8x22B) against the published totals and against sums worked out by hand in the comments, the
// per-GPU layout arithmetic, and what does and does not fit.
#include "engine/tools/plan_memory.h"

#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "engine/model/builtin_models.h"
#include "engine/model/hf_config.h"
#include "engine/model/model_size.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace moeserve::engine {
namespace {

namespace fs = std::filesystem;

using ::testing::HasSubstr;

const fs::path kConfigs = fs::path(MOESERVE_SOURCE_DIR) / "tests" / "fixtures" / "configs";
constexpr int64_t kGiB = int64_t{1} << 30;

ModelConfig Config(const std::string& name) {
  std::ifstream in(kConfigs / (name + ".json"));
  std::stringstream text;
  text << in.rdbuf();
  absl::StatusOr<ModelConfig> config = ParseModelConfig(nlohmann::json::parse(text.str()), name);
  EXPECT_TRUE(config.ok()) << name << ": " << config.status();
  return config.ok() ? *config : ModelConfig();
}

const WeightFormat kBf16;
const WeightFormat kFp8 = [] {
  WeightFormat format;
  format.kind = WeightFormat::Kind::kFp8BlockScaled;
  return format;
}();

double Relative(int64_t value, double published) { return std::abs(value - published) / published; }

// builtin:qwen3-30b-bench (the GPU serving benchmark's model) is Qwen3-30B-A3B as published:
// the same parameters, layer kinds, routing, attention and KV cache per token.
TEST(ModelSize, Qwen3BenchBuiltinIsQwen3_30B_A3BAtFullSize) {
  const ModelConfig published = Config("qwen3-30b-a3b");
  absl::StatusOr<ModelConfig> bench = BuiltinModelConfig("builtin:qwen3-30b-bench");
  ASSERT_TRUE(bench.ok()) << bench.status();
  const ModelSize published_size = ComputeModelSize(published, kBf16);
  const ModelSize bench_size = ComputeModelSize(*bench, kBf16);
  EXPECT_EQ(bench_size.total_parameters, published_size.total_parameters);
  EXPECT_EQ(bench_size.active_parameters, published_size.active_parameters);
  EXPECT_EQ(KvCacheBytesPerToken(*bench, 2), KvCacheBytesPerToken(published, 2));
  EXPECT_EQ(bench->model_type, published.model_type);
  EXPECT_EQ(bench->attention_type, published.attention_type);
  EXPECT_EQ(bench->num_moe_layers(), published.num_moe_layers());
  EXPECT_EQ(bench->qk_norm, published.qk_norm);
  EXPECT_EQ(bench->rope_interleaved, published.rope_interleaved);
  EXPECT_EQ(bench->rope_theta, published.rope_theta);
  EXPECT_EQ(bench->scoring_func, published.scoring_func);
  EXPECT_EQ(bench->norm_topk_prob, published.norm_topk_prob);
  EXPECT_EQ(bench->num_experts_per_tok, published.num_experts_per_tok);
  EXPECT_EQ(bench->n_shared_experts, published.n_shared_experts);
  EXPECT_EQ(bench->eos_token_id, published.eos_token_id);
  EXPECT_TRUE(bench->routed_experts_on_device);
}

TEST(ModelSize, ParameterCountsMatchThePublishedOnes) {
  // DeepSeek-V3: 671B total, 37B activated (its paper and model card; the main model, without
  // the 14B multi-token-prediction module moeserve does not load). By hand: embeddings and LM
  // head 2 x 129,280 x 7,168 = 1,853,358,080; per layer MLA 187,107,328 + norms 14,336, x 61 =
  // 11,414,421,504; 3 dense MLPs 3 x 396,361,728 = 1,189,085,184; 58 MoE layers x (256 + 1
  // shared) x 44,040,192 + router 1,835,008 + bias 256 = 656,569,547,264; final norm 7,168.
  const ModelSize v3 = ComputeModelSize(Config("deepseek-v3"), kBf16);
  EXPECT_EQ(v3.total_parameters, 671'026'419'200);
  EXPECT_LT(Relative(v3.total_parameters, 671e9), 0.005);
  // Active: the published 37B leaves out the embedding lookup; counted here it is 37.55B.
  EXPECT_EQ(v3.active_parameters, 671'026'419'200 - 58LL * 248 * 44'040'192);
  EXPECT_LT(Relative(v3.active_parameters, 37e9), 0.02);
  EXPECT_EQ(v3.num_moe_layers, 58);
  EXPECT_EQ(v3.routed_expert_parameters, 3LL * 7168 * 2048);

  const ModelSize v2 = ComputeModelSize(Config("deepseek-v2"), kBf16);  // 236B, 21B active
  EXPECT_LT(Relative(v2.total_parameters, 236e9), 0.005);
  EXPECT_LT(Relative(v2.active_parameters, 21e9), 0.02);

  // Qwen3-235B-A22B: per layer attention 71,303,424 (q, k, v, o and the q/k norms), norms 8,192,
  // router 524,288, 128 experts x 18,874,368; x 94, plus 2 x 622,329,856 and 4,096.
  const ModelSize qwen235 = ComputeModelSize(Config("qwen3-235b-a22b"), kBf16);
  EXPECT_EQ(qwen235.total_parameters, 235'093'634'560);
  EXPECT_LT(Relative(qwen235.total_parameters, 235e9), 0.005);
  EXPECT_LT(Relative(qwen235.active_parameters, 22e9), 0.01);

  const ModelSize qwen30 = ComputeModelSize(Config("qwen3-30b-a3b"), kBf16);  // 30.5B, 3.3B
  EXPECT_EQ(qwen30.total_parameters, 30'532'122'624);
  EXPECT_LT(Relative(qwen30.total_parameters, 30.5e9), 0.005);
  EXPECT_LT(Relative(qwen30.active_parameters, 3.3e9), 0.02);

  // Mixtral 8x22B: 141B total, 39B active (Mistral's announcement).
  const ModelSize mixtral = ComputeModelSize(Config("mixtral-8x22b"), kBf16);
  EXPECT_EQ(mixtral.total_parameters, 140'620'634'112);
  EXPECT_LT(Relative(mixtral.total_parameters, 141e9), 0.005);
  EXPECT_LT(Relative(mixtral.active_parameters, 39e9), 0.005);
}

TEST(ModelSize, Fp8CountsOneBytePerQuantizedParameterPlusBlockScales) {
  const ModelSize v3 = ComputeModelSize(Config("deepseek-v3"), kFp8);
  // One routed expert of one layer: 3 x 7,168 x 2,048 bytes, and 3 matrices of 16 x 56 fp32
  // scales.
  EXPECT_EQ(v3.routed_expert_bytes, 44'040'192 + 3 * 16 * 56 * 4);
  // Dense, by hand: embeddings and LM head in bf16 3,706,716,160; per layer the five MLA
  // matrices 187,105,280 + their scales 45,792 + q_a/kv_a norms 4,096 + layer norms 28,672, x 61
  // = 11,418,214,240; 3 dense MLPs x (396,361,728 + 96,768) = 1,189,375,488; 58 MoE layers x
  // (router 3,670,016 + bias 512 + shared expert 44,050,944) = 2,767,845,376; final norm 14,336.
  EXPECT_EQ(v3.dense_bytes, 19'082'165'600);
  // In bf16 every parameter is two bytes.
  const ModelSize bf16 = ComputeModelSize(Config("deepseek-v3"), kBf16);
  EXPECT_EQ(bf16.dense_bytes, 2 * bf16.dense_parameters);
  EXPECT_EQ(bf16.routed_expert_bytes, 2 * bf16.routed_expert_parameters);
  // What DeepSeek-V3's FP8 checkpoint quantizes and what it keeps in bf16.
  EXPECT_TRUE(IsBlockQuantized("model.layers.3.mlp.experts.7.down_proj.weight", {7168, 2048}));
  EXPECT_TRUE(IsBlockQuantized("model.layers.0.self_attn.kv_a_proj_with_mqa.weight", {576, 7168}));
  EXPECT_FALSE(IsBlockQuantized("model.layers.3.mlp.gate.weight", {256, 7168}));
  EXPECT_FALSE(IsBlockQuantized("model.embed_tokens.weight", {129280, 7168}));
  EXPECT_FALSE(IsBlockQuantized("lm_head.weight", {129280, 7168}));
  EXPECT_FALSE(IsBlockQuantized("model.layers.0.input_layernorm.weight", {7168}));
}

// What the GPU backend keeps in FP8 among the dense weights: the projections it runs through
// its FP8 linear path, in whole 128 x 128 blocks; never the routed experts (they have their own
// path), MLA's kv_a (576 rows) or kv_b, GQA's q/k/v (stacked, fp32 out) or anything 1-D.
TEST(ModelSize, GpuKeepsTheDenseProjectionsItRunsInFp8) {
  const std::string layer = "model.layers.3.";
  EXPECT_TRUE(GpuKeepsDenseInFp8(layer + "mlp.gate_proj.weight", {18432, 7168}, true));
  EXPECT_TRUE(
      GpuKeepsDenseInFp8(layer + "mlp.shared_experts.down_proj.weight", {7168, 2048}, true));
  EXPECT_TRUE(GpuKeepsDenseInFp8(layer + "self_attn.o_proj.weight", {7168, 16384}, true));
  EXPECT_TRUE(GpuKeepsDenseInFp8(layer + "self_attn.q_a_proj.weight", {1536, 7168}, true));
  EXPECT_TRUE(GpuKeepsDenseInFp8(layer + "self_attn.q_b_proj.weight", {24576, 1536}, true));
  EXPECT_TRUE(GpuKeepsDenseInFp8(layer + "self_attn.o_proj.weight", {4096, 8192}, false));
  EXPECT_FALSE(GpuKeepsDenseInFp8(layer + "mlp.experts.7.down_proj.weight", {7168, 2048}, true));
  EXPECT_FALSE(
      GpuKeepsDenseInFp8(layer + "self_attn.kv_a_proj_with_mqa.weight", {576, 7168}, true));
  EXPECT_FALSE(GpuKeepsDenseInFp8(layer + "self_attn.kv_b_proj.weight", {32768, 512}, true));
  EXPECT_FALSE(GpuKeepsDenseInFp8(layer + "self_attn.q_proj.weight", {8192, 4096}, false));
  EXPECT_FALSE(GpuKeepsDenseInFp8(layer + "self_attn.o_proj.weight", {7168, 100}, true));
  EXPECT_FALSE(GpuKeepsDenseInFp8(layer + "mlp.gate.weight", {256, 7168}, true));
  EXPECT_FALSE(GpuKeepsDenseInFp8("lm_head.weight", {129280, 7168}, true));
}

TEST(ModelSize, KvCacheBytesPerToken) {
  // MLA: (kv_lora_rank 512 + rope 64) x 61 layers x 2 bytes.
  EXPECT_EQ(KvCacheBytesPerToken(Config("deepseek-v3"), 2), 576 * 61 * 2);
  // GQA: 2 x 4 KV heads x 128 x 94 layers x 2 bytes; Mixtral 2 x 8 x 128 x 56 x 2.
  EXPECT_EQ(KvCacheBytesPerToken(Config("qwen3-235b-a22b"), 2), 2 * 4 * 128 * 94 * 2);
  EXPECT_EQ(KvCacheBytesPerToken(Config("mixtral-8x22b"), 2), 2 * 8 * 128 * 56 * 2);
  EXPECT_EQ(KvCacheBytesPerToken(Config("qwen3-30b-a3b"), 4), 2 * 4 * 128 * 48 * 4);
}

PlanMemoryOptions Options(const std::string& config, int ep, double gpu_memory_gib) {
  PlanMemoryOptions options;
  options.model = (kConfigs / (config + ".json")).string();
  options.ep = ep;
  options.gpu_memory_gib = gpu_memory_gib;
  return options;
}

TEST(PlanMemory, DeepSeekV3Fp8OnEightH200s) {
  absl::StatusOr<MemoryPlan> plan = PlanMemory(Options("deepseek-v3", 8, 139));
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->weight_dtype, "fp8");  // from the config's quantization_config
  EXPECT_EQ(plan->expert_slots_per_gpu, 32);
  // The dense weights as the GPU backend holds them (bf16 by default), and as the checkpoint
  // stores them.
  const int64_t dense_bf16 = ComputeModelSize(Config("deepseek-v3"), WeightFormat{}).dense_bytes;
  EXPECT_EQ(plan->dense_bytes, dense_bf16);
  EXPECT_EQ(plan->size.dense_bytes, 19'082'165'600);
  EXPECT_EQ(plan->expert_bytes, 32LL * 58 * 44'050'944);
  // 139 GiB - weights - the 4 GiB reserve, in tokens of 70,272 bytes.
  const int64_t kv = 135 * kGiB - dense_bf16 - 32LL * 58 * 44'050'944;
  EXPECT_EQ(plan->kv_bytes, kv);
  EXPECT_EQ(plan->tokens_per_gpu, kv / 70'272);
  EXPECT_EQ(plan->required_tokens_per_gpu, 163'840);  // one request of the full context
  EXPECT_TRUE(plan->fits);
  EXPECT_EQ(plan->smallest_fitting_ep, 8);
  const std::string report = FormatMemoryPlan(*plan);
  EXPECT_THAT(report, HasSubstr("671.03 B parameters, 37.55 B active per token"));
  EXPECT_THAT(report, HasSubstr("32 expert slots per GPU in each MoE layer ((256 + 0) / 8)"));
  EXPECT_THAT(report, HasSubstr("70,272 bytes per token in bf16"));
  EXPECT_THAT(report, HasSubstr("31.88 GiB   as served (17.77 GiB as stored)"));
}

// --gpu-dense-weights as-stored: bf16, less a byte a value (plus an fp32 scale per 128 x 128
// block) for the projections the GPU runs in FP8 — each layer's q_a, q_b and o, the 3 dense
// MLPs and the 58 MoE layers' shared experts. One full-context request then fits 16 H100s.
TEST(PlanMemory, DenseProjectionsAsStoredFitDeepSeekV3OnSixteenH100s) {
  PlanMemoryOptions options = Options("deepseek-v3", 16, 78);
  absl::StatusOr<MemoryPlan> bf16 = PlanMemory(options);
  ASSERT_TRUE(bf16.ok()) << bf16.status();
  EXPECT_FALSE(bf16->fits);
  options.gpu_dense_weights = "as-stored";
  absl::StatusOr<MemoryPlan> plan = PlanMemory(options);
  ASSERT_TRUE(plan.ok()) << plan.status();
  auto fp8_saving = [](int64_t out, int64_t in) {
    return out * in - 4 * ((out + 127) / 128) * ((in + 127) / 128);
  };
  const int64_t attention =
      fp8_saving(1536, 7168) + fp8_saving(128 * 192, 1536) + fp8_saving(7168, 128 * 128);
  const int64_t dense_mlp = 2 * fp8_saving(18432, 7168) + fp8_saving(7168, 18432);
  const int64_t shared = 2 * fp8_saving(2048, 7168) + fp8_saving(7168, 2048);
  EXPECT_EQ(plan->dense_bytes, bf16->dense_bytes - 61 * attention - 3 * dense_mlp - 58 * shared);
  EXPECT_TRUE(plan->fits) << plan->does_not_fit;
  EXPECT_EQ(plan->tokens_per_gpu, 259'285);
  EXPECT_THAT(FormatMemoryPlan(*plan),
              HasSubstr("dense weights in fp8 where the GPU runs them so"));
  options.gpu_dense_weights = "fp8";
  EXPECT_FALSE(PlanMemory(options).ok());
  // A bf16 model has no FP8 projections to keep.
  PlanMemoryOptions mixtral = Options("mixtral-8x22b", 8, 78);
  absl::StatusOr<MemoryPlan> mixtral_bf16 = PlanMemory(mixtral);
  mixtral.gpu_dense_weights = "as-stored";
  absl::StatusOr<MemoryPlan> mixtral_as_stored = PlanMemory(mixtral);
  ASSERT_TRUE(mixtral_bf16.ok() && mixtral_as_stored.ok());
  EXPECT_EQ(mixtral_as_stored->dense_bytes, mixtral_bf16->dense_bytes);
}

TEST(PlanMemory, RedundantExpertsAddSlots) {
  PlanMemoryOptions options = Options("deepseek-v3", 16, 78);
  options.num_redundant_experts = 32;
  absl::StatusOr<MemoryPlan> plan = PlanMemory(options);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->expert_slots_per_gpu, 18);  // (256 + 32) / 16
  EXPECT_EQ(plan->expert_bytes, 18LL * 58 * 44'050'944);
}

TEST(PlanMemory, NamesWhatDoesNotFit) {
  // DeepSeek-V3 in bf16 on 8 x 139 GiB: 1.25 TiB of weights.
  PlanMemoryOptions bf16 = Options("deepseek-v3", 8, 139);
  bf16.dtype = "bf16";
  absl::StatusOr<MemoryPlan> plan = PlanMemory(bf16);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_FALSE(plan->fits);
  EXPECT_THAT(plan->does_not_fit, HasSubstr("the weights do not fit"));
  EXPECT_EQ(plan->smallest_fitting_ep, 16);
  EXPECT_THAT(FormatMemoryPlan(*plan), HasSubstr("DOES NOT FIT: the weights do not fit"));

  // The weights fit, but not the KV cache that was asked for.
  PlanMemoryOptions kv = Options("mixtral-8x22b", 8, 78);
  kv.max_tokens_per_gpu = 10'000'000;
  plan = PlanMemory(kv);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_FALSE(plan->fits);
  EXPECT_THAT(plan->does_not_fit, HasSubstr("the KV cache does not fit"));
  EXPECT_THAT(plan->does_not_fit, HasSubstr("fewer than the 10,000,000 required"));
  EXPECT_EQ(plan->smallest_fitting_ep, 0);
}

TEST(PlanMemory, RefusesBadOptions) {
  auto error = [](const PlanMemoryOptions& options) {
    absl::StatusOr<MemoryPlan> plan = PlanMemory(options);
    EXPECT_FALSE(plan.ok());
    return plan.ok() ? std::string() : std::string(plan.status().message());
  };
  EXPECT_THAT(error(Options("deepseek-v3", 7, 139)),
              HasSubstr("the 256 expert slots (256 routed + 0 redundant) do not divide over "
                        "--ep 7"));
  EXPECT_THAT(error(Options("deepseek-v3", 0, 139)), HasSubstr("--ep"));
  EXPECT_THAT(error(Options("deepseek-v3", 8, 0)), HasSubstr("--gpu-memory-gib"));
  PlanMemoryOptions dtype = Options("deepseek-v3", 8, 139);
  dtype.dtype = "int4";
  EXPECT_THAT(error(dtype), HasSubstr("--dtype must be fp8 or bf16"));
  PlanMemoryOptions kv_dtype = Options("deepseek-v3", 8, 139);
  kv_dtype.kv_dtype = "fp16";
  EXPECT_THAT(error(kv_dtype), HasSubstr("--kv-dtype"));
  EXPECT_THAT(error(Options("no-such-model", 8, 139)), HasSubstr("no config.json"));
}

// The built-in GPU benchmark models size as they are served: builtin:v3-bench-fp8-deep's six
// MoE layers of FP8 experts (256 x 44,050,944 bytes each) fit one 78 GiB H100 with a few GiB
// of KV cache; in bf16 they would not.
TEST(PlanMemory, SizesBuiltinModels) {
  PlanMemoryOptions deep;
  deep.model = "builtin:v3-bench-fp8-deep";
  deep.ep = 1;
  deep.gpu_memory_gib = 78;
  absl::StatusOr<MemoryPlan> plan = PlanMemory(deep);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->weight_dtype, "fp8");
  EXPECT_EQ(plan->expert_bytes, 256LL * 6 * 44'050'944);
  EXPECT_TRUE(plan->fits) << plan->does_not_fit;
  EXPECT_GT(plan->kv_bytes, 2 * kGiB);
  EXPECT_LT(plan->kv_bytes, 4 * kGiB);
  deep.dtype = "bf16";
  plan = PlanMemory(deep);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_FALSE(plan->fits);
  EXPECT_THAT(plan->does_not_fit, HasSubstr("the weights do not fit"));

  PlanMemoryOptions unknown = deep;
  unknown.model = "builtin:huge";
  EXPECT_THAT(PlanMemory(unknown).status().message(), HasSubstr("unknown built-in model"));
}

TEST(PlanMemory, ReadsACheckpointFolderAndSizesConfigsMoeserveWouldNotServe) {
  // A checkpoint folder: its config.json, FP8 because of its quantization_config.
  PlanMemoryOptions folder;
  folder.model = (kConfigs.parent_path() / "hf" / "deepseek_v3_fp8").string();
  folder.ep = 4;
  folder.gpu_memory_gib = 1;
  folder.reserve_gib = 0;
  absl::StatusOr<MemoryPlan> plan = PlanMemory(folder);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->weight_dtype, "fp8");
  EXPECT_EQ(plan->config.name, "deepseek_v3_fp8");
  EXPECT_TRUE(plan->fits);

  // A rope type moeserve does not implement changes no size: the plan is made, with a note.
  const fs::path dir = fs::path(::testing::TempDir()) / "plan_memory_llama3_rope";
  fs::create_directories(dir);
  std::ifstream in(kConfigs / "qwen3-30b-a3b.json");
  std::stringstream text;
  text << in.rdbuf();
  nlohmann::json json = nlohmann::json::parse(text.str());
  json["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", 8.0}};
  std::ofstream(dir / "config.json") << json.dump();
  PlanMemoryOptions relaxed;
  relaxed.model = dir.string();
  relaxed.ep = 1;
  relaxed.gpu_memory_gib = 78;
  plan = PlanMemory(relaxed);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_THAT(plan->serving_note, HasSubstr("unsupported rope type `llama3`"));
  EXPECT_EQ(plan->size.total_parameters, 30'532'122'624);
  EXPECT_THAT(FormatMemoryPlan(*plan), HasSubstr("note     moeserve would refuse to serve"));
}

}  // namespace
}  // namespace moeserve::engine
