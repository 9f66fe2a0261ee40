// Helpers for the checkpoint-loading tests: small model configs, temporary folders, and writers
// for checkpoint folders in any dtype and file layout (built on EncodeSafetensors). Test-only;
// not thread-safe.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "engine/model/loader.h"
#include "engine/model/safetensors.h"
#include "engine/model/weights.h"
#include "nlohmann/json.hpp"

namespace moeserve::engine::testing {

// A fresh empty folder under the test's temporary directory.
std::filesystem::path MakeTempFolder(const std::string& name);

// A small DeepSeek-V3 config (q-LoRA, YaRN, one dense then two MoE layers with 8 experts in 4
// groups, a shared expert) and a small Qwen3-MoE / Mixtral one (GQA).
nlohmann::json SmallDeepSeekV3Json();
nlohmann::json SmallQwen3MoeJson();
nlohmann::json SmallMixtralJson();

// Deterministic random weights for a config.json object.
std::map<std::string, Tensor> RandomWeights(const nlohmann::json& config_json, uint64_t seed = 7);

void WriteText(const std::filesystem::path& path, const std::string& text);
std::string ReadText(const std::filesystem::path& path);

// Tensors as stored bytes: F32, or rounded to BF16 / F16.
std::vector<EncodedTensor> Encode(const std::map<std::string, Tensor>& tensors, DType dtype);
// The float values a reader gets back from Encode(tensors, dtype).
std::map<std::string, Tensor> RoundTo(const std::map<std::string, Tensor>& tensors, DType dtype);

// Writes config.json and model.safetensors.
void WriteCheckpoint(const std::filesystem::path& folder, const nlohmann::json& config_json,
                     const std::vector<EncodedTensor>& tensors);
// Writes config.json, `num_shards` shards (tensors dealt round-robin) and the index.
void WriteShardedCheckpoint(const std::filesystem::path& folder, const nlohmann::json& config_json,
                            const std::vector<EncodedTensor>& tensors, int num_shards);

// Logits [tokens, vocab] of one forward pass over `tokens` (all positions).
std::vector<float> Logits(const Model& model, const std::vector<int32_t>& tokens);
absl::StatusOr<std::vector<float>> LoadAndRun(const std::filesystem::path& folder,
                                              const std::vector<int32_t>& tokens);

}  // namespace moeserve::engine::testing
