// Checkpoint folders in Hugging Face layout: finds the safetensors files (a single
// `model.safetensors`, or the shards that `model.safetensors.index.json` lists), checks the index
// against the shards, and turns the stored tensors into the canonical fp32 tensors ModelWeights
// expects.
//
// On the way it dequantizes FP8 (e4m3) weights with their block scales (`<name>_scale_inv`,
// weight = fp8 * scale_inv per block, DeepSeek-V3's 128x128 blocks unless the config's
// `quantization_config.weight_block_size` says otherwise), maps Mixtral's names
// (`block_sparse_moe`, `w1`/`w3`/`w2`) and fused expert tensors (`mlp.experts.gate_up_proj`
// [experts, 2 * intermediate, hidden], `mlp.experts.down_proj` [experts, hidden, intermediate])
// onto per-expert names, and leaves out what the engine does not run (DeepSeek-V3's multi-token
// prediction layers, rotary `inv_freq` buffers, an lm_head tied to the embedding).
//
// Called once by LoadModel; stateless free functions.
#pragma once

#include <map>
#include <string>

#include "absl/status/statusor.h"
#include "engine/model/model_config.h"
#include "engine/model/weights.h"
#include "nlohmann/json_fwd.hpp"

namespace moeserve::engine {

// Reads every tensor of the checkpoint in `folder` as canonical fp32 tensors. `config_json` is
// the folder's config.json (for the FP8 block size and the multi-token prediction layer count).
// NOT_FOUND: no safetensors file, or a shard the index names is missing. INVALID_ARGUMENT: a
// corrupt file or index, a tensor listed in the wrong shard, an FP8 weight without its scale
// (or the other way round), a fused tensor of the wrong shape, a tensor stored twice.
absl::StatusOr<std::map<std::string, Tensor>> ReadCheckpointTensors(
    const std::string& folder, const ModelConfig& config, const nlohmann::json& config_json);

}  // namespace moeserve::engine
