// The GPU backend's weights: uploading a model's weights to a rank's device, the slots of its
// placement, and staging a new placement's changed slots in the background.
#include <algorithm>
#include <cmath>
#include <thread>
#include <vector>

#include "engine/backend/cuda/rank_state.h"
#include "engine/base/status_macros.h"
#include "engine/model/architecture.h"
#include "engine/model/model_size.h"
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
  out.gate_up.fp8 = out.down.fp8 = fp8;
  if (!fp8) {
    RETURN_IF_ERROR(out.gate_up.bf16.Reserve(2 * matrix));
    RETURN_IF_ERROR(out.down.bf16.Reserve(matrix));
    RETURN_IF_ERROR(kernels::FillRandomBf16(
        out.gate_up.bf16.data(), static_cast<int64_t>(2 * matrix), seed, gate_up_std, stream));
    return kernels::FillRandomBf16(out.down.bf16.data(), static_cast<int64_t>(matrix), seed + 1,
                                   down_std, stream);
  }
  // The same bf16 values, quantized as a checkpoint's would be (128x128 blocks).
  RETURN_IF_ERROR(scratch.Reserve(2 * matrix));
  RETURN_IF_ERROR(out.gate_up.codes.Reserve(2 * matrix));
  RETURN_IF_ERROR(out.gate_up.scales.Reserve(kernels::WeightScaleCount(2 * intermediate, hidden)));
  RETURN_IF_ERROR(kernels::FillRandomBf16(scratch.data(), static_cast<int64_t>(2 * matrix), seed,
                                          gate_up_std, stream));
  RETURN_IF_ERROR(kernels::QuantizeWeightBlocksFp8(scratch.data(), 2 * intermediate, hidden,
                                                   out.gate_up.codes.data(),
                                                   out.gate_up.scales.data(), stream));
  RETURN_IF_ERROR(out.down.codes.Reserve(matrix));
  RETURN_IF_ERROR(out.down.scales.Reserve(kernels::WeightScaleCount(hidden, intermediate)));
  RETURN_IF_ERROR(kernels::FillRandomBf16(scratch.data(), static_cast<int64_t>(matrix), seed + 1,
                                          down_std, stream));
  return kernels::QuantizeWeightBlocksFp8(scratch.data(), hidden, intermediate,
                                          out.down.codes.data(), out.down.scales.data(), stream);
}

absl::Status UploadMlp(WeightUploader& uploader, DeviceMlp& out, const std::string& prefix,
                       bool fp8) {
  const std::string gate = prefix + "gate_proj.weight", up = prefix + "up_proj.weight",
                    down = prefix + "down_proj.weight";
  out.gate_up.fp8 = out.down.fp8 = fp8;
  if (fp8) {
    RETURN_IF_ERROR(uploader.UploadFp8(out.gate_up.codes, out.gate_up.scales, {gate, up}));
    return uploader.UploadFp8(out.down.codes, out.down.scales, {down});
  }
  RETURN_IF_ERROR(uploader.Upload(out.gate_up.bf16, {gate, up}));
  return uploader.Upload(out.down.bf16, {down});
}

uint64_t RankUploadBytes(const ModelConfig& config, const TensorSource& source, int slots_per_rank,
                         bool fp8_experts, bool fp8_dense) {
  uint64_t bytes = 0;
  ForEachExpectedTensor(config, [&](const std::string& name, const std::vector<int64_t>& shape) {
    if (name.find(".mlp.experts.") != std::string::npos) return true;
    // Dense weights stored in FP8 that UploadLinear keeps so: a byte per value.
    const bool stays_fp8 = fp8_dense && GpuKeepsDenseInFp8(name, shape, config.uses_mla()) &&
                           source.StoredAsFp8Blocks(name);
    bytes += NumElements(shape) * (stays_fp8 ? 1 : sizeof(uint16_t));
    return true;
  });
  // A tied LM head is the embedding, uploaded a second time.
  if (config.tie_word_embeddings)
    bytes += static_cast<uint64_t>(config.vocab_size) * config.hidden_size * sizeof(uint16_t);
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

absl::Status CudaRankBackend::State::UploadLinear(WeightUploader& uploader, DeviceLinear& out,
                                                  std::initializer_list<std::string> names) {
  const TensorSource& source = model->tensor_source();
  // FP8 needs every part in whole 128 x 128 blocks (Fp8Linear; the rule plan memory sizes by)
  // and one width.
  bool fp8 = fp8_dense;
  bool stored_fp8 = true;
  int64_t rows = 0, in = -1;
  for (const std::string& name : names) {
    const std::vector<int64_t>* shape = source.Shape(name);
    if (shape == nullptr || shape->size() != 2) {
      fp8 = false;  // Upload names what is missing or wrong
      break;
    }
    fp8 = fp8 && GpuKeepsDenseInFp8(name, *shape, config().uses_mla()) &&
          (in < 0 || (*shape)[1] == in);
    stored_fp8 = stored_fp8 && source.StoredAsFp8Blocks(name);
    rows += (*shape)[0];
    in = (*shape)[1];
  }
  out.fp8 = fp8 && (stored_fp8 || config().routed_experts_fp8);
  if (!out.fp8) return uploader.Upload(out.bf16, names);
  RETURN_IF_ERROR(PrepareFp8Dense());
  if (stored_fp8) return uploader.UploadFp8(out.codes, out.scales, names);
  // A built-in FP8 model's bf16 weight, quantized as a checkpoint's would be; the bf16 copy is
  // freed once the codes are made.
  RETURN_IF_ERROR(uploader.Upload(out.bf16, names));
  RETURN_IF_ERROR(out.codes.Reserve(static_cast<size_t>(rows * in)));
  RETURN_IF_ERROR(out.scales.Reserve(kernels::WeightScaleCount(rows, in)));
  RETURN_IF_ERROR(kernels::QuantizeWeightBlocksFp8(out.bf16.data(), static_cast<int>(rows),
                                                   static_cast<int>(in), out.codes.data(),
                                                   out.scales.data(), stream));
  RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(stream), "quantize a dense weight"));
  out.bf16 = DeviceArray<Bf16>();
  return absl::OkStatus();
}

absl::Status CudaRankBackend::State::PrepareFp8Dense() {
  if (fp8_linear != nullptr) return absl::OkStatus();
  const ModelConfig& c = config();
  const int max_rows = std::max(options.max_batch_tokens, 1);
  // The widest input and output of any projection that can be FP8, in whole blocks.
  const int shared_intermediate = c.moe_intermediate_size * c.n_shared_experts;
  const int intermediate = std::max(c.intermediate_size, shared_intermediate);
  const int max_k = std::max({c.hidden_size, intermediate, c.q_lora_rank,
                              c.num_attention_heads * std::max(c.v_head_dim, c.head_dim)});
  const int max_n = std::max({c.hidden_size, 2 * intermediate, c.q_lora_rank,
                              c.num_attention_heads * std::max(c.qk_head_dim(), c.head_dim)});
  auto whole_blocks = [](int size) {
    return (size + kernels::kFp8BlockSize - 1) / kernels::kFp8BlockSize * kernels::kFp8BlockSize;
  };
  ASSIGN_OR_RETURN(
      kernels::Fp8Linear linear,
      kernels::Fp8Linear::Create(max_rows, whole_blocks(max_k), whole_blocks(max_n), stream));
  fp8_linear = std::make_unique<kernels::Fp8Linear>(std::move(linear));
  RETURN_IF_ERROR(fp8_mlp_gate_up.Reserve(static_cast<size_t>(max_rows) * 2 * intermediate));
  return fp8_mlp_act.Reserve(static_cast<size_t>(max_rows) * intermediate);
}

absl::Status CudaRankBackend::State::UploadMlaWeights(WeightUploader& uploader, int layer,
                                                      DeviceLayer& d) {
  auto attention = [&](absl::string_view name) {
    return LayerTensor(layer, absl::StrCat("self_attn.", name, ".weight"));
  };
  if (config().q_lora_rank > 0) {
    RETURN_IF_ERROR(UploadLinear(uploader, d.q_a, {attention("q_a_proj")}));
    RETURN_IF_ERROR(uploader.Upload(d.q_a_norm, {attention("q_a_layernorm")}));
    RETURN_IF_ERROR(UploadLinear(uploader, d.q_b, {attention("q_b_proj")}));
  } else {
    RETURN_IF_ERROR(UploadLinear(uploader, d.q, {attention("q_proj")}));
  }
  RETURN_IF_ERROR(uploader.Upload(d.kv_a, {attention("kv_a_proj_with_mqa")}));
  RETURN_IF_ERROR(uploader.Upload(d.kv_a_norm, {attention("kv_a_layernorm")}));
  RETURN_IF_ERROR(uploader.Upload(d.kv_b, {attention("kv_b_proj")}));
  return UploadLinear(uploader, d.o, {attention("o_proj")});
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
  return UploadLinear(uploader, d.o, {attention("o_proj")});
}

absl::Status CudaRankBackend::State::LoadWeights(WeightUploader& uploader) {
  const ModelConfig& c = config();
  auto UploadDenseMlp = [&](DeviceMlp& out, const std::string& prefix) {
    RETURN_IF_ERROR(UploadLinear(uploader, out.gate_up,
                                 {prefix + "gate_proj.weight", prefix + "up_proj.weight"}));
    return UploadLinear(uploader, out.down, {prefix + "down_proj.weight"});
  };
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
      RETURN_IF_ERROR(UploadDenseMlp(d.dense, LayerTensor(layer, "mlp.")));
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
      RETURN_IF_ERROR(UploadDenseMlp(d.shared, LayerTensor(layer, "mlp.shared_experts.")));
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
