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
#include "kernels/gqa_attention.h"
#include "kernels/kernels.h"

namespace moeserve::engine::cuda {

namespace {

// The bf16 copy a thread's uploads are converted into. It is kept between uploads: a fresh
// buffer per tensor cost a page fault per 4 KiB page every time (most of a checkpoint's upload
// time); ReleaseUploadStaging() gives it back once a rank's weights are on the device.
thread_local std::vector<uint16_t> upload_staging;

// Converts `values` to bf16 into `out` (round to nearest even, as the kernels' twins do); a
// large span on several threads.
void ConvertToBf16(std::span<const float> values, uint16_t* out) {
  constexpr size_t kValuesPerThread = size_t{1} << 22;
  constexpr size_t kMaxThreads = 16;
  auto convert = [&](size_t begin, size_t end) {
    for (size_t i = begin; i < end; ++i) out[i] = kernels::FloatToBf16(values[i]);
  };
  const size_t threads =
      std::clamp<size_t>(std::min<size_t>(std::thread::hardware_concurrency(), kMaxThreads), 1,
                         std::max<size_t>(1, values.size() / kValuesPerThread));
  const size_t share = (values.size() + threads - 1) / threads;
  std::vector<std::thread> helpers;
  for (size_t t = 1; t < threads; ++t) {
    helpers.emplace_back(convert, std::min(values.size(), t * share),
                         std::min(values.size(), (t + 1) * share));
  }
  convert(0, std::min(values.size(), share));
  for (std::thread& helper : helpers) helper.join();
}

// Uploads the concatenation of `parts` as one bf16 array.
absl::Status UploadBf16Parts(DeviceArray<Bf16>& out,
                             std::initializer_list<std::span<const float>> parts,
                             cudaStream_t stream) {
  size_t total = 0;
  for (std::span<const float> part : parts) total += part.size();
  if (upload_staging.size() < total) upload_staging.resize(total);
  size_t offset = 0;
  for (std::span<const float> part : parts) {
    ConvertToBf16(part, upload_staging.data() + offset);
    offset += part.size();
  }
  return out.Upload(reinterpret_cast<const Bf16*>(upload_staging.data()), total, stream);
}

}  // namespace

void ReleaseUploadStaging() { std::vector<uint16_t>().swap(upload_staging); }

absl::Status UploadBf16(DeviceArray<Bf16>& out, std::span<const float> values,
                        cudaStream_t stream) {
  return UploadBf16Parts(out, {values}, stream);
}

absl::Status UploadBf16(DeviceArray<Bf16>& out, const float* values, size_t count,
                        cudaStream_t stream) {
  return UploadBf16(out, std::span<const float>(values, count), stream);
}

// A routed expert that exists on the GPU only (ModelConfig::routed_experts_on_device): random
// weights from a seed of (layer, expert), so every replica of an expert is the same expert.
absl::Status GenerateMlp(DeviceMlp& out, int layer, int expert, int intermediate, int hidden,
                         cudaStream_t stream) {
  const size_t matrix = static_cast<size_t>(intermediate) * hidden;
  RETURN_IF_ERROR(out.gate_up.Reserve(2 * matrix));
  RETURN_IF_ERROR(out.down.Reserve(matrix));
  const uint64_t seed = 0x6d6f657365727665ull ^ (static_cast<uint64_t>(layer) << 40) ^
                        (static_cast<uint64_t>(expert) << 8);
  // Standard deviation 1/sqrt(fan-in), as the host-generated matrices have.
  RETURN_IF_ERROR(kernels::FillRandomBf16(out.gate_up.data(), static_cast<int64_t>(2 * matrix),
                                          seed, 1.0f / std::sqrt(static_cast<float>(hidden)),
                                          stream));
  return kernels::FillRandomBf16(out.down.data(), static_cast<int64_t>(matrix), seed + 1,
                                 1.0f / std::sqrt(static_cast<float>(intermediate)), stream);
}

absl::Status UploadMlp(DeviceMlp& out, const MlpWeights& mlp, int hidden, cudaStream_t stream) {
  const size_t matrix = static_cast<size_t>(mlp.intermediate_size) * hidden;
  RETURN_IF_ERROR(UploadBf16Parts(
      out.gate_up,
      {std::span<const float>(mlp.gate_proj, matrix), std::span<const float>(mlp.up_proj, matrix)},
      stream));
  return UploadBf16(out.down, mlp.down_proj, matrix, stream);
}

absl::Status CheckCudaSupport(const ModelConfig& config) {
  if (!ArchitectureOf(config).runs_on_gpu) {
    return absl::InvalidArgumentError(absl::StrCat("the GPU backend does not run `",
                                                   config.model_type,
                                                   "` models: serve it with --device cpu"));
  }
  if (config.uses_mla() && config.kv_lora_rank > 1024) {
    return absl::InvalidArgumentError("the GPU backend supports kv_lora_rank up to 1024");
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

absl::Status CudaRankBackend::State::UploadMlaWeights(const AttentionWeights& a, DeviceLayer& d) {
  const ModelConfig& c = config();
  const int hidden = c.hidden_size;
  const int heads = c.num_attention_heads;
  const int qk = c.qk_head_dim();
  const int row_dim = c.kv_lora_rank + c.qk_rope_head_dim;
  if (c.q_lora_rank > 0) {
    RETURN_IF_ERROR(
        UploadBf16(d.q_a, a.q_a_proj, static_cast<size_t>(c.q_lora_rank) * hidden, stream));
    RETURN_IF_ERROR(UploadBf16(d.q_a_norm, a.q_a_layernorm, c.q_lora_rank, stream));
    RETURN_IF_ERROR(
        UploadBf16(d.q_b, a.q_b_proj, static_cast<size_t>(heads) * qk * c.q_lora_rank, stream));
  } else {
    RETURN_IF_ERROR(UploadBf16(d.q, a.q_proj, static_cast<size_t>(heads) * qk * hidden, stream));
  }
  RETURN_IF_ERROR(
      UploadBf16(d.kv_a, a.kv_a_proj_with_mqa, static_cast<size_t>(row_dim) * hidden, stream));
  RETURN_IF_ERROR(UploadBf16(d.kv_a_norm, a.kv_a_layernorm, c.kv_lora_rank, stream));
  RETURN_IF_ERROR(UploadBf16(
      d.kv_b, a.kv_b_proj,
      static_cast<size_t>(heads) * (c.qk_nope_head_dim + c.v_head_dim) * c.kv_lora_rank, stream));
  return UploadBf16(d.o, a.o_proj, static_cast<size_t>(hidden) * heads * c.v_head_dim, stream);
}

absl::Status CudaRankBackend::State::UploadGroupedQueryWeights(const AttentionWeights& a,
                                                               DeviceLayer& d) {
  const ModelConfig& c = config();
  const size_t hidden = c.hidden_size;
  const size_t q_rows = static_cast<size_t>(c.num_attention_heads) * c.head_dim;
  const size_t kv_rows = static_cast<size_t>(c.num_key_value_heads) * c.head_dim;
  // q, k and v stacked: one GEMM gives a token's whole projection (kernels/gqa_twins.h).
  std::vector<float> stacked((q_rows + 2 * kv_rows) * hidden);
  std::copy_n(a.q_proj, q_rows * hidden, stacked.begin());
  std::copy_n(a.k_proj, kv_rows * hidden, stacked.begin() + q_rows * hidden);
  std::copy_n(a.v_proj, kv_rows * hidden, stacked.begin() + (q_rows + kv_rows) * hidden);
  RETURN_IF_ERROR(UploadBf16(d.qkv, stacked, stream));
  d.has_qk_norm = c.qk_norm;
  if (c.qk_norm) {
    RETURN_IF_ERROR(UploadBf16(d.q_norm, a.q_norm, c.head_dim, stream));
    RETURN_IF_ERROR(UploadBf16(d.k_norm, a.k_norm, c.head_dim, stream));
  }
  return UploadBf16(d.o, a.o_proj, hidden * q_rows, stream);
}

absl::Status CudaRankBackend::State::LoadWeights() {
  const ModelConfig& c = config();
  const ModelWeights& weights = model->weights();
  const int hidden = c.hidden_size;

  RETURN_IF_ERROR(UploadBf16(embed, weights.embed_tokens(),
                             static_cast<size_t>(c.vocab_size) * hidden, stream));
  RETURN_IF_ERROR(UploadBf16(final_norm, weights.final_norm(), hidden, stream));
  RETURN_IF_ERROR(
      UploadBf16(lm_head, weights.lm_head(), static_cast<size_t>(c.vocab_size) * hidden, stream));
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
    const LayerWeights& l = weights.layer(layer);
    DeviceLayer& d = layers[layer];
    RETURN_IF_ERROR(UploadBf16(d.input_norm, l.input_layernorm, hidden, stream));
    RETURN_IF_ERROR(UploadBf16(d.post_attention_norm, l.post_attention_layernorm, hidden, stream));
    RETURN_IF_ERROR(c.uses_mla() ? UploadMlaWeights(l.attention, d)
                                 : UploadGroupedQueryWeights(l.attention, d));
    if (!l.is_moe) {
      RETURN_IF_ERROR(UploadMlp(d.dense, l.dense_mlp, hidden, stream));
      continue;
    }
    RETURN_IF_ERROR(
        UploadBf16(d.gate, l.moe.gate, static_cast<size_t>(c.n_routed_experts) * hidden, stream));
    if (l.moe.e_score_correction_bias != nullptr) {
      d.has_correction_bias = true;
      RETURN_IF_ERROR(
          d.correction_bias.Upload(l.moe.e_score_correction_bias, c.n_routed_experts, stream));
    }
    if (l.moe.has_shared) {
      d.has_shared = true;
      RETURN_IF_ERROR(UploadMlp(d.shared, l.moe.shared, hidden, stream));
    }
  }
  return absl::OkStatus();
}

absl::Status CudaRankBackend::State::LoadSlots(const ExpertPlacement& placement) {
  if (placement.version() == placement_version) return absl::OkStatus();
  const ModelConfig& c = config();
  const int slots_per_rank = placement.num_physical() / options.group_size;
  const int first_slot = options.rank * slots_per_rank;
  for (int layer = 0; layer < c.num_hidden_layers; ++layer) {
    const int moe_layer = model->moe_index(layer);
    if (moe_layer < 0) continue;
    DeviceLayer& d = layers[layer];
    d.slots.resize(slots_per_rank);
    d.slot_expert.resize(slots_per_rank, -1);
    const MoeWeights& moe = model->weights().layer(layer).moe;
    for (int slot = 0; slot < slots_per_rank; ++slot) {
      const int expert = placement.phy2log(moe_layer)[first_slot + slot];
      if (d.slot_expert[slot] == expert) continue;  // unchanged slots keep their weights
      if (c.routed_experts_on_device) {
        RETURN_IF_ERROR(GenerateMlp(d.slots[slot], layer, expert, c.moe_intermediate_size,
                                    c.hidden_size, stream));
      } else {
        RETURN_IF_ERROR(UploadMlp(d.slots[slot], moe.experts[expert], c.hidden_size, stream));
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
                                    c.hidden_size, copy_stream));
      } else {
        RETURN_IF_ERROR(UploadMlp(staged.weights, model->weights().layer(layer).moe.experts[expert],
                                  c.hidden_size, copy_stream));
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
