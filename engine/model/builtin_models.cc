#include "engine/model/builtin_models.h"

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace moeserve::engine {

std::vector<std::string> BuiltinModelNames() {
  return {"builtin:tiny",
          "builtin:tiny-nolora",
          "builtin:tiny-v2",
          "builtin:tiny-e256",
          "builtin:v3-bench",
          "builtin:v3-bench-fp8",
          "builtin:v3-bench-fp8-deep",
          "builtin:qwen3-30b-bench"};
}

namespace {

// Qwen3-30B-A3B's dimensions at full depth, for GPU benchmarks (its published config.json is
// tests/fixtures/configs/qwen3-30b-a3b.json): hidden 2048, 48 layers, all MoE; grouped-query
// attention with 32 query heads and 4 key/value heads of 128, per-head q/k RMSNorm and
// rotate-half RoPE (theta 1e6); 128 routed experts of 768, 8 per token (softmax over all,
// renormalized), no shared expert; vocabulary 151936. Random weights; the routed experts (about
// 58 GB in bf16) are generated on the GPU that holds them. Token ids only (no tokenizer).
ModelConfig Qwen3BenchConfig(const std::string& name) {
  ModelConfig c;
  c.name = name;
  c.model_type = "qwen3_moe";
  c.attention_type = AttentionType::kGroupedQuery;
  c.vocab_size = 151936;
  c.bos_token_id = 151643;
  c.eos_token_id = 151645;
  c.hidden_size = 2048;
  c.intermediate_size = 6144;  // dense layers (none: mlp_only_layers is empty)
  c.moe_intermediate_size = 768;
  c.num_hidden_layers = 48;
  c.decoder_sparse_step = 1;
  c.num_attention_heads = 32;
  c.num_key_value_heads = 4;
  c.head_dim = 128;
  c.qk_norm = true;
  c.rope_interleaved = false;
  c.n_routed_experts = 128;
  c.num_experts_per_tok = 8;
  c.scoring_func = ScoringFunction::kSoftmax;
  c.topk_method = TopKMethod::kGreedy;
  c.norm_topk_prob = true;
  c.routed_scaling_factor = 1.0;
  c.max_position_embeddings = 40960;
  c.rope_theta = 1000000.0;
  c.rms_norm_eps = 1e-6;
  c.routed_experts_on_device = true;
  return c;
}

}  // namespace

absl::StatusOr<ModelConfig> BuiltinModelConfig(const std::string& name) {
  // DeepSeek-V3's architecture scaled down: MLA with q-LoRA, YaRN, 1 dense layer then MoE
  // layers with sigmoid scoring, 8 expert groups of which 4 are chosen, 6 of 64 experts per
  // token and one shared expert. Vocabulary: 256 bytes + <bos> + <eos>.
  ModelConfig c;
  c.name = name;
  c.model_type = "deepseek_v3";
  c.vocab_size = 258;
  c.bos_token_id = 256;
  c.eos_token_id = 257;
  c.hidden_size = 256;
  c.intermediate_size = 512;
  c.moe_intermediate_size = 64;
  c.num_hidden_layers = 4;
  c.first_k_dense_replace = 1;
  c.num_attention_heads = 4;
  c.q_lora_rank = 96;
  c.kv_lora_rank = 64;
  c.qk_nope_head_dim = 32;
  c.qk_rope_head_dim = 16;
  c.v_head_dim = 32;
  c.n_routed_experts = 64;
  c.n_shared_experts = 1;
  c.num_experts_per_tok = 6;
  c.n_group = 8;
  c.topk_group = 4;
  c.scoring_func = ScoringFunction::kSigmoid;
  c.topk_method = TopKMethod::kNoAuxTc;
  c.norm_topk_prob = true;
  c.routed_scaling_factor = 2.5;
  c.max_position_embeddings = 4096;
  c.rope_theta = 10000.0;
  c.rope_scaling = {.type = RopeScaling::Type::kYarn,
                    .factor = 4.0,
                    .original_max_position_embeddings = 1024,
                    .beta_fast = 32.0,
                    .beta_slow = 1.0,
                    .mscale = 1.0,
                    .mscale_all_dim = 0.8};
  c.rms_norm_eps = 1e-6;
  if (name == "builtin:tiny") return c;
  if (name == "builtin:tiny-nolora") {
    // The MLA variant without q-LoRA (queries projected directly) and with plain RoPE.
    c.q_lora_rank = 0;
    c.rope_scaling = RopeScaling{};
    return c;
  }
  if (name == "builtin:tiny-e256") {
    // DeepSeek-V3's expert count: 256 routed experts in 8 groups, 8 per token, so that
    // expert parallelism up to 128 ranks (2 experts each) needs no redundant experts.
    c.n_routed_experts = 256;
    c.num_experts_per_tok = 8;
    c.moe_intermediate_size = 32;
    return c;
  }
  if (name == "builtin:v3-bench" || name == "builtin:v3-bench-fp8" ||
      name == "builtin:v3-bench-fp8-deep") {
    // DeepSeek-V3's dimensions at reduced depth, for GPU benchmarks: hidden 7168, 128 MLA heads
    // (q-LoRA 1536, latent 512, rope 64), 256 routed experts of 2048 (8 per token, 8 groups of
    // which 4) plus one shared, vocabulary 129280; 4 layers, the first 2 dense. The routed
    // experts (about 22.5 GB per MoE layer in bf16) are generated on the GPUs that hold them.
    // Token ids only (no tokenizer).
    c.vocab_size = 129280;
    c.bos_token_id = 0;
    c.eos_token_id = 1;
    c.hidden_size = 7168;
    c.intermediate_size = 18432;
    c.moe_intermediate_size = 2048;
    c.num_hidden_layers = 4;
    c.first_k_dense_replace = 2;
    c.num_attention_heads = 128;
    c.q_lora_rank = 1536;
    c.kv_lora_rank = 512;
    c.qk_nope_head_dim = 128;
    c.qk_rope_head_dim = 64;
    c.v_head_dim = 128;
    c.n_routed_experts = 256;
    c.num_experts_per_tok = 8;
    c.max_position_embeddings = 16384;
    c.rope_scaling.factor = 40.0;
    c.rope_scaling.original_max_position_embeddings = 4096;
    c.rope_scaling.mscale_all_dim = 1.0;
    c.routed_experts_on_device = true;
    // The -fp8 sibling keeps its routed experts in FP8 on the GPU (11.3 GB per MoE layer), as
    // a DeepSeek-V3 checkpoint's are served; the dense weights are the same.
    c.routed_experts_fp8 = name != "builtin:v3-bench";
    // The -fp8-deep sibling has 8 layers (6 MoE, 68 GB of FP8 experts: it fits one 80 GB GPU
    // with a small KV cache), so that a decode step's time per MoE layer can be compared
    // across depths.
    if (name == "builtin:v3-bench-fp8-deep") c.num_hidden_layers = 8;
    return c;
  }
  if (name == "builtin:qwen3-30b-bench") return Qwen3BenchConfig(name);
  if (name == "builtin:tiny-v2") {
    // DeepSeek-V2-style routing: softmax scores, group score = the group's best expert.
    c.model_type = "deepseek_v2";
    c.scoring_func = ScoringFunction::kSoftmax;
    c.topk_method = TopKMethod::kGroupLimitedGreedy;
    c.norm_topk_prob = false;
    c.routed_scaling_factor = 1.0;
    c.q_lora_rank = 0;
    return c;
  }
  std::string known;
  for (const auto& n : BuiltinModelNames()) absl::StrAppend(&known, known.empty() ? "" : ", ", n);
  return absl::InvalidArgumentError(
      absl::StrCat("unknown built-in model `", name, "` (available: ", known, ")"));
}

}  // namespace moeserve::engine
