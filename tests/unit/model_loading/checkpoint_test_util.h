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

// A [rows, cols] weight quantized as DeepSeek-V3's checkpoint stores it: e4m3 codes `name` and
// fp32 scales `name`_scale_inv, one per 128x128 block (scale = the block's max |value| / 448).
// `dequantized` is what a reader gets back (code * scale).
struct Fp8BlockWeight {
  EncodedTensor codes;
  EncodedTensor scales;
  Tensor dequantized;
};
Fp8BlockWeight QuantizeFp8Blocks(const std::string& name, const Tensor& weight);

// Writes config.json and model.safetensors.
void WriteCheckpoint(const std::filesystem::path& folder, const nlohmann::json& config_json,
                     const std::vector<EncodedTensor>& tensors);
// Writes config.json, `num_shards` shards (tensors dealt round-robin) and the index.
void WriteShardedCheckpoint(const std::filesystem::path& folder, const nlohmann::json& config_json,
                            const std::vector<EncodedTensor>& tensors, int num_shards);

// Opens `folder` without host weights and checks that every tensor read on demand (fp32 and
// bf16, whole and in ranges) equals `host_model`'s copy of it.
void ExpectOnDemandReadsMatch(const std::filesystem::path& folder, const Model& host_model);

// Logits [tokens, vocab] of one forward pass over `tokens` (all positions).
std::vector<float> Logits(const Model& model, const std::vector<int32_t>& tokens);
// Loads `folder` (and checks ExpectOnDemandReadsMatch) and runs it.
absl::StatusOr<std::vector<float>> LoadAndRun(const std::filesystem::path& folder,
                                              const std::vector<int32_t>& tokens);

}  // namespace moeserve::engine::testing
