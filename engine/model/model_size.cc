#include "engine/model/model_size.h"

#include <string>

#include "engine/model/weights.h"

namespace moeserve::engine {
namespace {

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t BytesOf(const std::string& name, const std::vector<int64_t>& shape,
                const WeightFormat& format) {
  int64_t elements = 1;
  for (int64_t d : shape) elements *= d;
  if (format.kind == WeightFormat::Kind::kBf16 || !IsBlockQuantized(name, shape)) {
    return 2 * elements;
  }
  const int64_t scales =
      CeilDiv(shape[0], format.block_rows) * CeilDiv(shape[1], format.block_cols);
  return elements + 4 * scales;
}

}  // namespace

bool GpuKeepsDenseInFp8(std::string_view tensor_name, const std::vector<int64_t>& shape, bool mla) {
  if (shape.size() != 2 || shape[0] % 128 != 0 || shape[1] % 128 != 0) return false;
  if (tensor_name.find(".mlp.experts.") != std::string_view::npos) return false;
  for (std::string_view projection :
       {"gate_proj.weight", "up_proj.weight", "down_proj.weight", "self_attn.o_proj.weight"}) {
    if (tensor_name.ends_with(projection)) return true;
  }
  if (!mla) return false;
  for (std::string_view projection :
       {"self_attn.q_a_proj.weight", "self_attn.q_b_proj.weight", "self_attn.q_proj.weight"}) {
    if (tensor_name.ends_with(projection)) return true;
  }
  return false;
}

int64_t GpuDenseBytes(const ModelConfig& config, const WeightFormat& format, bool fp8_dense) {
  const bool fp8 = fp8_dense && format.kind == WeightFormat::Kind::kFp8BlockScaled &&
                   config.n_routed_experts > 0;
  int64_t bytes = 0;
  ForEachExpectedTensor(config, [&](const std::string& name, const std::vector<int64_t>& shape) {
    if (name.find(".mlp.experts.") != std::string::npos) return true;
    const bool stays_fp8 = fp8 && GpuKeepsDenseInFp8(name, shape, config.uses_mla());
    bytes += BytesOf(name, shape, stays_fp8 ? format : WeightFormat{});
    return true;
  });
  return bytes;
}

bool IsBlockQuantized(std::string_view tensor_name, const std::vector<int64_t>& shape) {
  return shape.size() == 2 && tensor_name.ends_with(".weight") &&
         tensor_name != "model.embed_tokens.weight" && tensor_name != "lm_head.weight" &&
         !tensor_name.ends_with(".mlp.gate.weight");
}

ModelSize ComputeModelSize(const ModelConfig& config, const WeightFormat& format) {
  ModelSize size;
  size.num_moe_layers = config.num_moe_layers();
  size.num_routed_experts = config.n_routed_experts;
  int64_t routed_parameters = 0;
  int64_t routed_bytes = 0;
  ForEachExpectedTensor(config, [&](const std::string& name, const std::vector<int64_t>& shape) {
    int64_t elements = 1;
    for (int64_t d : shape) elements *= d;
    const int64_t bytes = BytesOf(name, shape, format);
    size.total_parameters += elements;
    if (name.find(".mlp.experts.") != std::string::npos) {
      routed_parameters += elements;
      routed_bytes += bytes;
    } else {
      size.dense_parameters += elements;
      size.dense_bytes += bytes;
    }
    return true;
  });
  const int64_t expert_layers = static_cast<int64_t>(size.num_moe_layers) * config.n_routed_experts;
  if (expert_layers > 0) {
    // Every routed expert of every MoE layer has the same shapes.
    size.routed_expert_parameters = routed_parameters / expert_layers;
    size.routed_expert_bytes = routed_bytes / expert_layers;
  }
  const int64_t unused_per_token =
      static_cast<int64_t>(config.n_routed_experts - config.num_experts_per_tok) *
      size.num_moe_layers * size.routed_expert_parameters;
  size.active_parameters = size.total_parameters - (expert_layers > 0 ? unused_per_token : 0);
  return size;
}

int64_t KvCacheBytesPerToken(const ModelConfig& config, int bytes_per_value) {
  const int64_t values_per_layer =
      config.uses_mla() ? static_cast<int64_t>(config.kv_lora_rank) + config.qk_rope_head_dim
                        : 2 * static_cast<int64_t>(config.num_key_value_heads) * config.head_dim;
  return values_per_layer * config.num_hidden_layers * bytes_per_value;
}

}  // namespace moeserve::engine
