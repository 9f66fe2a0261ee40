// Model weights: named fp32 tensors (Hugging Face names) and typed per-layer views of them.
//
// Owns the weight memory of one model replica. Built once at start-up (generated for the built-in
// models, loaded from checkpoints by engine/model/loader.h), then read-only: safe to read from
// many threads. Tensor names are the canonical Hugging Face ones of DeepSeek and Qwen3-MoE
// (`mlp.gate`, `mlp.experts.{i}.gate_proj/up_proj/down_proj`); the checkpoint reader maps
// Mixtral's and fused-expert names onto them.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/model/model_config.h"
#include "engine/model/tensor_source.h"

namespace moeserve::engine {

struct Tensor {
  std::vector<int64_t> shape;
  std::vector<float> data;
  int64_t num_elements() const;
};

// A SwiGLU MLP: down(silu(gate(x)) * up(x)). Matrices are row-major [out, in].
struct MlpWeights {
  const float* gate_proj = nullptr;  // [intermediate, hidden]
  const float* up_proj = nullptr;    // [intermediate, hidden]
  const float* down_proj = nullptr;  // [hidden, intermediate]
  int intermediate_size = 0;
};

struct AttentionWeights {
  // MLA (DeepSeek). q_proj is shared with GQA.
  const float* q_a_proj = nullptr;            // [q_lora, hidden]          (q-LoRA only)
  const float* q_a_layernorm = nullptr;       // [q_lora]                   (q-LoRA only)
  const float* q_b_proj = nullptr;            // [heads * qk_head, q_lora]  (q-LoRA only)
  const float* q_proj = nullptr;              // [heads * qk_head, hidden]  (no q-LoRA)
  const float* kv_a_proj_with_mqa = nullptr;  // [kv_lora + rope, hidden]
  const float* kv_a_layernorm = nullptr;      // [kv_lora]
  const float* kv_b_proj = nullptr;           // [heads * (nope + v), kv_lora]
  const float* o_proj = nullptr;              // [hidden, heads * v] (GQA: heads * head_dim)
  // GQA (Qwen3-MoE, Mixtral); q_proj is [heads * head_dim, hidden].
  const float* k_proj = nullptr;  // [kv_heads * head_dim, hidden]
  const float* v_proj = nullptr;  // [kv_heads * head_dim, hidden]
  const float* q_norm = nullptr;  // [head_dim] (qk_norm only)
  const float* k_norm = nullptr;  // [head_dim] (qk_norm only)
  const float* q_bias = nullptr;  // attention_bias only
  const float* k_bias = nullptr;
  const float* v_bias = nullptr;
  const float* o_bias = nullptr;
};

struct MoeWeights {
  const float* gate = nullptr;                     // [experts, hidden]
  const float* e_score_correction_bias = nullptr;  // [experts] or null
  std::vector<MlpWeights> experts;                 // one per routed (logical) expert
  MlpWeights shared;                               // intermediate = moe_intermediate * n_shared
  bool has_shared = false;
};

struct LayerWeights {
  const float* input_layernorm = nullptr;
  const float* post_attention_layernorm = nullptr;
  AttentionWeights attention;
  bool is_moe = false;
  MlpWeights dense_mlp;
  MoeWeights moe;
};

// Also a TensorSource over its own tensors (the GPU backend uploads built-in models from it).
class ModelWeights final : public TensorSource {
 public:
  // Deterministic random weights for a config (the built-in models).
  static ModelWeights Generate(const ModelConfig& config, uint64_t seed);
  // Wraps named tensors; checks that every expected tensor is present with the expected shape
  // and that no unexpected tensor is left over.
  static absl::StatusOr<ModelWeights> FromTensors(const ModelConfig& config,
                                                  std::map<std::string, Tensor> tensors);

  // No tensors, only the config: a model whose weights are read from its checkpoint by the
  // backend that computes with them (every view is null).
  static ModelWeights ConfigOnly(const ModelConfig& config);

  ModelWeights(ModelWeights&&) = default;
  ModelWeights& operator=(ModelWeights&&) = default;

  const ModelConfig& config() const { return config_; }
  const float* embed_tokens() const { return embed_tokens_; }
  const float* final_norm() const { return final_norm_; }
  const float* lm_head() const { return lm_head_; }
  const LayerWeights& layer(int index) const { return layers_[index]; }
  const std::map<std::string, Tensor>& tensors() const { return tensors_; }

  const std::vector<int64_t>* Shape(const std::string& name) const override;
  absl::Status ReadFloat(const std::string& name, int64_t first,
                         std::span<float> out) const override;
  absl::Status ReadBf16(const std::string& name, int64_t first,
                        std::span<uint16_t> out) const override;

 private:
  ModelWeights() = default;
  absl::Status BindViews();

  ModelConfig config_;
  std::map<std::string, Tensor> tensors_;
  const float* embed_tokens_ = nullptr;
  const float* final_norm_ = nullptr;
  const float* lm_head_ = nullptr;
  std::vector<LayerWeights> layers_;
};

// The tensor names and shapes a config needs, in a stable order.
std::vector<std::pair<std::string, std::vector<int64_t>>> ExpectedTensors(
    const ModelConfig& config);
// The same one at a time, without building the list (a config may describe far more tensors
// than a checkpoint holds); stops early when `visit` returns false.
void ForEachExpectedTensor(
    const ModelConfig& config,
    const std::function<bool(const std::string& name, const std::vector<int64_t>& shape)>& visit);

// Checks that `shapes` holds exactly the tensors the config needs, with their shapes:
// INVALID_ARGUMENT naming the first missing or misshapen tensor, or an unexpected one.
absl::Status CheckExpectedTensors(const ModelConfig& config,
                                  const std::map<std::string, std::vector<int64_t>>& shapes);

// The LM head's tensor: the embedding's when the config ties them.
std::string LmHeadTensorName(const ModelConfig& config);

// Writes tensors as a float32 safetensors file.
absl::Status WriteSafetensors(const std::string& path,
                              const std::map<std::string, Tensor>& tensors);

}  // namespace moeserve::engine
