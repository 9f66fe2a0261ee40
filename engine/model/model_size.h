// ModelSize: what a model's weights and KV cache weigh, from its config alone (no weights
// needed), for sizing expert-parallel layouts (`moeserve plan memory`).
//
// Parameters are counted over exactly the tensors the loader expects (ForEachExpectedTensor in
// weights.h), so the count is the served model's: DeepSeek-V3's multi-token-prediction layers,
// which moeserve does not load, are not in it. They are split into what every expert-parallel
// rank holds (embeddings, attention, dense MLPs, shared experts, routers, norms: the "dense"
// part) and the routed experts, which ranks share out slot by slot.
//
// Bytes depend on the storage format: bf16 (2 bytes a parameter), or FP8 as DeepSeek-V3 ships
// it (`quantization_config` with `weight_block_size` [128, 128]): every projection matrix
// (attention, dense MLP, routed and shared experts) in e4m3, one byte a parameter, plus one
// fp32 scale per 128x128 block; the embeddings, the LM head, the router and the 1-D norms and
// biases stay bf16.
//
// Pure functions; thread-safe.
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

#include "engine/model/model_config.h"

namespace moeserve::engine {

struct WeightFormat {
  enum class Kind { kBf16, kFp8BlockScaled };
  Kind kind = Kind::kBf16;
  int block_rows = 128;  // kFp8BlockScaled: the scale block [rows, cols]
  int block_cols = 128;
};

// Whether DeepSeek-V3's FP8 format quantizes this tensor: 2-D weights other than the
// embeddings, the LM head and the MoE router.
bool IsBlockQuantized(std::string_view tensor_name, const std::vector<int64_t>& shape);

// Whether the GPU backend keeps this dense (not routed-expert) tensor in FP8 when it serves a
// model's weights in FP8: the projections it runs through its FP8 linear path — the dense MLPs'
// and shared experts' gate, up and down, attention's o, and MLA's q_a, q_b and q — where both
// widths are whole 128 x 128 blocks. MLA's kv_a (576 rows) and kv_b (read head by head) and
// grouped-query attention's stacked q, k and v stay bf16.
bool GpuKeepsDenseInFp8(std::string_view tensor_name, const std::vector<int64_t>& shape, bool mla);

// The dense (not routed-expert) weights' bytes as the GPU backend holds them: bf16, but with
// `fp8_dense` (serve --gpu-dense-weights as-stored) and an FP8 `format` the tensors
// GpuKeepsDenseInFp8 names stay in it, scales included. Only MoE models serve their dense
// projections in FP8 (they follow the experts).
int64_t GpuDenseBytes(const ModelConfig& config, const WeightFormat& format, bool fp8_dense);

struct ModelSize {
  int64_t total_parameters = 0;
  // Per token: everything but the routed experts a token is not sent to.
  int64_t active_parameters = 0;
  int64_t dense_parameters = 0;          // held by every rank
  int64_t routed_expert_parameters = 0;  // one routed expert of one MoE layer
  int num_moe_layers = 0;
  int num_routed_experts = 0;
  // In the format asked for.
  int64_t dense_bytes = 0;
  int64_t routed_expert_bytes = 0;  // one routed expert of one MoE layer, scales included
};

ModelSize ComputeModelSize(const ModelConfig& config, const WeightFormat& format);

// Bytes one token's KV cache takes over all layers: MLA caches the compressed latent and the
// rope key (kv_lora_rank + qk_rope_head_dim values per layer), grouped-query attention every
// KV head's key and value (2 x num_key_value_heads x head_dim).
int64_t KvCacheBytesPerToken(const ModelConfig& config, int bytes_per_value);

}  // namespace moeserve::engine
