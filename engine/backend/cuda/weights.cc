// The GPU backend's weights: uploading a model's weights to a rank's device, the slots of its
// placement, and staging a new placement's changed slots in the background.
#include <algorithm>
#include <cmath>
#include <thread>
#include <vector>

#include "engine/backend/cuda/rank_state.h"
#include "engine/base/status_macros.h"
#include "engine/model/architecture.h"
#include "kernels/bf16.h"
#include "kernels/fp8.h"
#include "kernels/fp8_quantize.h"
#include "kernels/gqa_attention.h"
#include "kernels/kernels.h"
#include "kernels/mla.h"

namespace moeserve::engine::cuda {

namespace {

std::string LayerTensor(int layer, absl::string_view name) {
  return absl::StrCat("model.layers.", layer, ".", name);
}

std::string ExpertPrefix(int layer, int expert) {
  return absl::StrCat("model.layers.", layer, ".mlp.experts.", expert, ".");
}

}  // namespace

// A routed expert that exists on the GPU only (ModelConfig::routed_experts_on_device): random
// weights from a seed of (layer, expert), so every replica of an expert is the same expert.
absl::Status GenerateMlp(DeviceMlp& out, int layer, int expert, int intermediate, int hidden,
                         bool fp8, DeviceArray<Bf16>& scratch, cudaStream_t stream) {
  const size_t matrix = static_cast<size_t>(intermediate) * hidden;
  const uint64_t seed = 0x6d6f657365727665ull ^ (static_cast<uint64_t>(layer) << 40) ^
                        (static_cast<uint64_t>(expert) << 8);
  // Standard deviation 1/sqrt(fan-in), as the host-generated matrices have.
  const float gate_up_std = 1.0f / std::sqrt(static_cast<float>(hidden));
  const float down_std = 1.0f / std::sqrt(static_cast<float>(intermediate));
  if (!fp8) {
    RETURN_IF_ERROR(out.gate_up.Reserve(2 * matrix));
    RETURN_IF_ERROR(out.down.Reserve(matrix));
    RETURN_IF_ERROR(kernels::FillRandomBf16(out.gate_up.data(), static_cast<int64_t>(2 * matrix),
                                            seed, gate_up_std, stream));
    return kernels::FillRandomBf16(out.down.data(), static_cast<int64_t>(matrix), seed + 1,
                                   down_std, stream);
  }
  // The same bf16 values, quantized as a checkpoint's would be (128x128 blocks).
  RETURN_IF_ERROR(scratch.Reserve(2 * matrix));
  RETURN_IF_ERROR(out.gate_up_fp8.Reserve(2 * matrix));
  RETURN_IF_ERROR(out.gate_up_scales.Reserve(kernels::WeightScaleCount(2 * intermediate, hidden)));
  RETURN_IF_ERROR(kernels::FillRandomBf16(scratch.data(), static_cast<int64_t>(2 * matrix), seed,
                                          gate_up_std, stream));
  RETURN_IF_ERROR(kernels::QuantizeWeightBlocksFp8(scratch.data(), 2 * intermediate, hidden,
                                                   out.gate_up_fp8.data(),
                                                   out.gate_up_scales.data(), stream));
  RETURN_IF_ERROR(out.down_fp8.Reserve(matrix));
  RETURN_IF_ERROR(out.down_scales.Reserve(kernels::WeightScaleCount(hidden, intermediate)));
  RETURN_IF_ERROR(kernels::FillRandomBf16(scratch.data(), static_cast<int64_t>(matrix), seed + 1,
                                          down_std, stream));
  return kernels::QuantizeWeightBlocksFp8(scratch.data(), hidden, intermediate, out.down_fp8.data(),
                                          out.down_scales.data(), stream);
}

absl::Status UploadMlp(WeightUploader& uploader, DeviceMlp& out, const std::string& prefix,
                       bool fp8) {
  const std::string gate = prefix + "gate_proj.weight", up = prefix + "up_proj.weight",
                    down = prefix + "down_proj.weight";
  if (fp8) {
    RETURN_IF_ERROR(uploader.UploadFp8(out.gate_up_fp8, out.gate_up_scales, {gate, up}));
    return uploader.UploadFp8(out.down_fp8, out.down_scales, {down});
  }
  RETURN_IF_ERROR(uploader.Upload(out.gate_up, {gate, up}));
  return uploader.Upload(out.down, {down});
}

uint64_t RankUploadBytes(const ModelConfig& config, int slots_per_rank, bool fp8_experts) {
  uint64_t elements = 0;
  ForEachExpectedTensor(config, [&](const std::string& name, const std::vector<int64_t>& shape) {
    if (name.find(".mlp.experts.") == std::string::npos) elements += NumElements(shape);
    return true;
  });
  // A tied LM head is the embedding, uploaded a second time.
  if (config.tie_word_embeddings)
    elements += static_cast<uint64_t>(config.vocab_size) * config.hidden_size;
  uint64_t bytes = elements * sizeof(uint16_t);
  if (!config.routed_experts_on_device) {
    bytes += static_cast<uint64_t>(config.num_moe_layers()) * slots_per_rank * 3 *
             config.hidden_size * config.moe_intermediate_size * (fp8_experts ? 1 : 2);
  }
  return bytes;
}

absl::Status CheckCudaSupport(const ModelConfig& config) {
  if (!ArchitectureOf(config).runs_on_gpu) {
    return absl::InvalidArgumentError(absl::StrCat("the GPU backend does not run `",
                                                   config.model_type,
                                                   "` models: serve it with --device cpu"));
  }
  if (config.uses_mla() && config.kv_lora_rank > kernels::kMaxMlaLatent) {
    return absl::InvalidArgumentError(
        absl::StrCat("the GPU backend supports kv_lora_rank up to ", kernels::kMaxMlaLatent));
  }
  if (!config.uses_mla()) {
    // No published Qwen3-MoE or Mixtral checkpoint has attention biases; the CPU engine runs
    // them.
    if (config.attention_bias) {
      return absl::InvalidArgumentError(
          "the GPU backend does not run attention biases (`attention_bias`: true): serve this "
          "model with --device cpu");
    }
    absl::Status shape = kernels::CheckGqaShape(
        {config.num_attention_heads, config.num_key_value_heads, config.head_dim});
    if (!shape.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "the GPU backend's grouped-query attention cannot run this model: ", shape.message(),
          "; serve it with --device cpu"));
    }
  }
  if (config.n_routed_experts > 1024 || config.num_experts_per_tok > 32 || config.n_group > 32) {
    return absl::InvalidArgumentError(
        "the GPU backend's gate supports up to 1024 experts, 32 per token and 32 groups");
  }
  return absl::OkStatus();
}

absl::Status CudaRankBackend::State::UploadMlaWeights(WeightUploader& uploader, int layer,
                                                      DeviceLayer& d) {
  auto attention = [&](absl::string_view name) {
    return LayerTensor(layer, absl::StrCat("self_attn.", name, ".weight"));
  };
  if (config().q_lora_rank > 0) {
    RETURN_IF_ERROR(uploader.Upload(d.q_a, {attention("q_a_proj")}));
    RETURN_IF_ERROR(uploader.Upload(d.q_a_norm, {attention("q_a_layernorm")}));
    RETURN_IF_ERROR(uploader.Upload(d.q_b, {attention("q_b_proj")}));
  } else {
    RETURN_IF_ERROR(uploader.Upload(d.q, {attention("q_proj")}));
  }
  RETURN_IF_ERROR(uploader.Upload(d.kv_a, {attention("kv_a_proj_with_mqa")}));
  RETURN_IF_ERROR(uploader.Upload(d.kv_a_norm, {attention("kv_a_layernorm")}));
  RETURN_IF_ERROR(uploader.Upload(d.kv_b, {attention("kv_b_proj")}));
  return uploader.Upload(d.o, {attention("o_proj")});
}

absl::Status CudaRankBackend::State::UploadGroupedQueryWeights(WeightUploader& uploader, int layer,
                                                               DeviceLayer& d) {
  auto attention = [&](absl::string_view name) {
    return LayerTensor(layer, absl::StrCat("self_attn.", name, ".weight"));
  };
  // q, k and v stacked: one GEMM gives a token's whole projection (kernels/gqa_twins.h).
  RETURN_IF_ERROR(
      uploader.Upload(d.qkv, {attention("q_proj"), attention("k_proj"), attention("v_proj")}));
  d.has_qk_norm = config().qk_norm;
  if (config().qk_norm) {
    RETURN_IF_ERROR(uploader.Upload(d.q_norm, {attention("q_norm")}));
    RETURN_IF_ERROR(uploader.Upload(d.k_norm, {attention("k_norm")}));
  }
  return uploader.Upload(d.o, {attention("o_proj")});
}

absl::Status CudaRankBackend::State::LoadWeights(WeightUploader& uploader) {
  const ModelConfig& c = config();
  RETURN_IF_ERROR(uploader.Upload(embed, {"model.embed_tokens.weight"}));
  RETURN_IF_ERROR(uploader.Upload(final_norm, {"model.norm.weight"}));
  RETURN_IF_ERROR(uploader.Upload(lm_head, {LmHeadTensorName(c)}));
  // Rotations for every position this rank's KV cache can hold (no request reaches further).
  std::vector<float> cos_table, sin_table;
  model->rope().Table(static_cast<int>(std::min<int64_t>(
                          c.max_position_embeddings,
                          static_cast<int64_t>(options.kv_blocks) * options.kv_block_size)),
                      cos_table, sin_table);
  RETURN_IF_ERROR(rope_cos.Upload(cos_table.data(), cos_table.size(), stream));
  RETURN_IF_ERROR(rope_sin.Upload(sin_table.data(), sin_table.size(), stream));
  layers.resize(c.num_hidden_layers);
  for (int layer = 0; layer < c.num_hidden_layers; ++layer) {
    DeviceLayer& d = layers[layer];
    RETURN_IF_ERROR(uploader.Upload(d.input_norm, {LayerTensor(layer, "input_layernorm.weight")}));
    RETURN_IF_ERROR(uploader.Upload(d.post_attention_norm,
                                    {LayerTensor(layer, "post_attention_layernorm.weight")}));
    RETURN_IF_ERROR(c.uses_mla() ? UploadMlaWeights(uploader, layer, d)
                                 : UploadGroupedQueryWeights(uploader, layer, d));
    if (model->moe_index(layer) < 0) {
      RETURN_IF_ERROR(UploadMlp(uploader, d.dense, LayerTensor(layer, "mlp."), /*fp8=*/false));
      continue;
    }
    RETURN_IF_ERROR(uploader.Upload(d.gate, {LayerTensor(layer, "mlp.gate.weight")}));
    const std::string bias = LayerTensor(layer, "mlp.gate.e_score_correction_bias");
    if (model->tensor_source().Shape(bias) != nullptr) {
      d.has_correction_bias = true;
      RETURN_IF_ERROR(uploader.UploadFloat(d.correction_bias, bias));
    }
    if (c.n_shared_experts > 0) {
      d.has_shared = true;
      RETURN_IF_ERROR(UploadMlp(uploader, d.shared, LayerTensor(layer, "mlp.shared_experts."),
                                /*fp8=*/false));
    }
  }
  return absl::OkStatus();
}

absl::Status CudaRankBackend::State::LoadSlots(const ExpertPlacement& placement) {
  if (placement.version() == placement_version) return absl::OkStatus();
  WeightUploader uploader(model->tensor_source(), stream);
  DeviceArray<Bf16> generate_scratch;
  const ModelConfig& c = config();
  const int slots_per_rank = placement.num_physical() / options.group_size;
  const int first_slot = options.rank * slots_per_rank;
  for (int layer = 0; layer < c.num_hidden_layers; ++layer) {
    const int moe_layer = model->moe_index(layer);
    if (moe_layer < 0) continue;
    DeviceLayer& d = layers[layer];
    d.slots.resize(slots_per_rank);
    d.slot_expert.resize(slots_per_rank, -1);
    for (int slot = 0; slot < slots_per_rank; ++slot) {
      const int expert = placement.phy2log(moe_layer)[first_slot + slot];
      if (d.slot_expert[slot] == expert) continue;  // unchanged slots keep their weights
      if (c.routed_experts_on_device) {
        RETURN_IF_ERROR(GenerateMlp(d.slots[slot], layer, expert, c.moe_intermediate_size,
                                    c.hidden_size, fp8_experts, generate_scratch, stream));
      } else {
        RETURN_IF_ERROR(
            UploadMlp(uploader, d.slots[slot], ExpertPrefix(layer, expert), fp8_experts));
      }
      d.slot_expert[slot] = expert;
    }
  }
  placement_version = placement.version();
  return absl::OkStatus();
}

absl::Status CudaRankBackend::State::StageSlots(const ExpertPlacement& placement) {
  // The staging thread drives the same device on its own stream; the rank keeps computing on
  // the compute stream with the current slots, which this never touches.
  RETURN_IF_ERROR(CudaStatus(cudaSetDevice(options.device), "select GPU for staging"));
  DiscardStagedSlots();
  WeightUploader uploader(model->tensor_source(), copy_stream);
  DeviceArray<Bf16> generate_scratch;
  const ModelConfig& c = config();
  const int slots_per_rank = placement.num_physical() / options.group_size;
  const int first_slot = options.rank * slots_per_rank;
  for (int layer = 0; layer < c.num_hidden_layers; ++layer) {
    const int moe_layer = model->moe_index(layer);
    if (moe_layer < 0) continue;
    const DeviceLayer& d = layers[layer];
    for (int slot = 0; slot < slots_per_rank; ++slot) {
      const int expert = placement.phy2log(moe_layer)[first_slot + slot];
      if (d.slot_expert[slot] == expert) continue;  // unchanged slots keep their buffers
      StagedSlot& staged = staged_slots.emplace_back();
      if (!spare_slots.empty()) {
        staged.weights = std::move(spare_slots.back());
        spare_slots.pop_back();
      }
      staged.layer = layer;
      staged.slot = slot;
      staged.expert = expert;
      if (c.routed_experts_on_device) {
        RETURN_IF_ERROR(GenerateMlp(staged.weights, layer, expert, c.moe_intermediate_size,
                                    c.hidden_size, fp8_experts, generate_scratch, copy_stream));
      } else {
        RETURN_IF_ERROR(
            UploadMlp(uploader, staged.weights, ExpertPrefix(layer, expert), fp8_experts));
      }
    }
  }
  RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(copy_stream), "staged slots"));
  staged_version = placement.version();
  return absl::OkStatus();
}

void CudaRankBackend::State::CommitSlots(const ExpertPlacement& placement) {
  if (staged_version != placement.version()) return;  // not staged: LoadSlots does it in-step
  for (StagedSlot& staged : staged_slots) {
    DeviceLayer& d = layers[staged.layer];
    std::swap(d.slots[staged.slot], staged.weights);
    d.slot_expert[staged.slot] = staged.expert;
  }
  placement_version = placement.version();
  // The replaced buffers (the step that used them has finished) are the next staging's spares.
  DiscardStagedSlots();
}

void CudaRankBackend::State::DiscardStagedSlots() {
  for (StagedSlot& staged : staged_slots) spare_slots.push_back(std::move(staged.weights));
  staged_slots.clear();
  staged_version = -1;
}

}  // namespace moeserve::engine::cuda
