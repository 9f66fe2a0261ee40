#include "tests/unit/model_loading/checkpoint_test_util.h"

#include <bit>
#include <cstring>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "engine/model/hf_config.h"
#include "engine/model/kv_rows.h"
#include "engine/runtime/block_allocator.h"
#include "gtest/gtest.h"

namespace moeserve::engine::testing {

namespace fs = std::filesystem;

fs::path MakeTempFolder(const std::string& name) {
  const ::testing::TestInfo* test = ::testing::UnitTest::GetInstance()->current_test_info();
  fs::path folder = fs::path(::testing::TempDir()) / "model_loading" /
                    absl::StrCat(test->test_suite_name(), ".", test->name()) / name;
  fs::remove_all(folder);
  fs::create_directories(folder);
  return folder;
}

nlohmann::json SmallDeepSeekV3Json() {
  return {
      {"model_type", "deepseek_v3"},
      {"vocab_size", 64},
      {"hidden_size", 32},
      {"intermediate_size", 48},
      {"moe_intermediate_size", 12},
      {"num_hidden_layers", 3},
      {"first_k_dense_replace", 1},
      {"num_attention_heads", 2},
      {"q_lora_rank", 24},
      {"kv_lora_rank", 16},
      {"qk_nope_head_dim", 8},
      {"qk_rope_head_dim", 4},
      {"v_head_dim", 8},
      {"n_routed_experts", 8},
      {"n_shared_experts", 1},
      {"num_experts_per_tok", 2},
      {"n_group", 4},
      {"topk_group", 2},
      {"norm_topk_prob", true},
      {"routed_scaling_factor", 2.5},
      {"max_position_embeddings", 256},
      {"bos_token_id", 0},
      {"eos_token_id", 1},
      {"rope_scaling",
       {{"type", "yarn"},
        {"factor", 4.0},
        {"original_max_position_embeddings", 64},
        {"beta_fast", 32},
        {"beta_slow", 1},
        {"mscale", 1.0},
        {"mscale_all_dim", 0.8}}},
  };
}

nlohmann::json SmallQwen3MoeJson() {
  return {
      {"model_type", "qwen3_moe"},
      {"vocab_size", 64},
      {"hidden_size", 32},
      {"intermediate_size", 40},
      {"moe_intermediate_size", 12},
      {"num_hidden_layers", 3},
      {"num_attention_heads", 4},
      {"num_key_value_heads", 2},
      {"head_dim", 8},
      {"num_experts", 6},
      {"num_experts_per_tok", 2},
      {"norm_topk_prob", true},
      {"decoder_sparse_step", 1},
      {"mlp_only_layers", {1}},
      {"max_position_embeddings", 128},
      {"rope_theta", 10000.0},
      {"bos_token_id", 0},
      {"eos_token_id", 1},
  };
}

nlohmann::json SmallMixtralJson() {
  return {
      {"model_type", "mixtral"},  {"vocab_size", 64},
      {"hidden_size", 32},        {"intermediate_size", 20},
      {"num_hidden_layers", 2},   {"num_attention_heads", 4},
      {"num_key_value_heads", 1}, {"num_local_experts", 4},
      {"num_experts_per_tok", 2}, {"max_position_embeddings", 128},
      {"rope_theta", 1e6},        {"sliding_window", nullptr},
      {"bos_token_id", 0},        {"eos_token_id", 1},
  };
}

std::map<std::string, Tensor> RandomWeights(const nlohmann::json& config_json, uint64_t seed) {
  absl::StatusOr<ModelConfig> config = ParseModelConfig(config_json, "test");
  EXPECT_TRUE(config.ok()) << config.status();
  return ModelWeights::Generate(*config, seed).tensors();
}

void WriteText(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
}

std::string ReadText(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

std::vector<EncodedTensor> Encode(const std::map<std::string, Tensor>& tensors, DType dtype) {
  std::vector<EncodedTensor> out;
  for (const auto& [name, tensor] : tensors) {
    EncodedTensor encoded{name, dtype, tensor.shape, {}};
    for (float value : tensor.data) {
      if (dtype == DType::kF32) {
        char bytes[4];
        std::memcpy(bytes, &value, 4);
        encoded.bytes.append(bytes, 4);
      } else {
        uint16_t bits = 0;
        if (dtype == DType::kBF16) {
          bits = FloatToBf16(value);
        } else {
          // Float to half by rounding through the value grid: the tests' weights are small and
          // normal in half precision, so nearest-even on the mantissa is enough.
          const uint32_t f = std::bit_cast<uint32_t>(value);
          const uint32_t sign = (f >> 16) & 0x8000;
          const int exponent = static_cast<int>((f >> 23) & 0xFF) - 127 + 15;
          uint32_t mantissa = f & 0x7FFFFF;
          if (exponent <= 0) {
            bits = static_cast<uint16_t>(sign);  // underflow to zero (not used by the tests)
          } else {
            uint32_t half = (static_cast<uint32_t>(exponent) << 10) | (mantissa >> 13);
            const uint32_t rest = mantissa & 0x1FFF;
            if (rest > 0x1000 || (rest == 0x1000 && (half & 1))) ++half;
            bits = static_cast<uint16_t>(sign | half);
          }
        }
        encoded.bytes.push_back(static_cast<char>(bits & 0xFF));
        encoded.bytes.push_back(static_cast<char>(bits >> 8));
      }
    }
    out.push_back(std::move(encoded));
  }
  return out;
}

std::map<std::string, Tensor> RoundTo(const std::map<std::string, Tensor>& tensors, DType dtype) {
  std::map<std::string, Tensor> out;
  for (const EncodedTensor& encoded : Encode(tensors, dtype)) {
    TensorEntry entry{dtype, encoded.shape, reinterpret_cast<const uint8_t*>(encoded.bytes.data()),
                      encoded.bytes.size()};
    out[encoded.name] = Tensor{encoded.shape, ToFloat32(entry)};
  }
  return out;
}

void WriteCheckpoint(const fs::path& folder, const nlohmann::json& config_json,
                     const std::vector<EncodedTensor>& tensors) {
  WriteText(folder / "config.json", config_json.dump(2));
  WriteText(folder / "model.safetensors", EncodeSafetensors(tensors));
}

void WriteShardedCheckpoint(const fs::path& folder, const nlohmann::json& config_json,
                            const std::vector<EncodedTensor>& tensors, int num_shards) {
  WriteText(folder / "config.json", config_json.dump(2));
  nlohmann::json weight_map = nlohmann::json::object();
  for (int shard = 0; shard < num_shards; ++shard) {
    const std::string file = absl::StrCat("model-", shard + 1, "-of-", num_shards, ".safetensors");
    std::vector<EncodedTensor> part;
    for (size_t i = shard; i < tensors.size(); i += num_shards) {
      part.push_back(tensors[i]);
      weight_map[tensors[i].name] = file;
    }
    WriteText(folder / file, EncodeSafetensors(part));
  }
  WriteText(
      folder / "model.safetensors.index.json",
      nlohmann::json{{"metadata", nlohmann::json::object()}, {"weight_map", weight_map}}.dump(2));
}

std::vector<float> Logits(const Model& model, const std::vector<int32_t>& tokens) {
  const int block_size = 16;
  const int blocks = (static_cast<int>(tokens.size()) + block_size - 1) / block_size;
  KvRows cache(model.config().num_hidden_layers, blocks, block_size, model.kv_row_dim());
  BlockAllocator cache_blocks(cache.num_blocks());
  std::vector<int32_t> table = *cache_blocks.Allocate(blocks);
  BatchSequence sequence{tokens, 0, &table, /*all_logits=*/true};
  return model.Forward({&sequence, 1}, cache);
}

absl::StatusOr<std::vector<float>> LoadAndRun(const fs::path& folder,
                                              const std::vector<int32_t>& tokens) {
  absl::StatusOr<LoadedModel> loaded = LoadModel(folder.string());
  if (!loaded.ok()) return loaded.status();
  return Logits(*loaded->model, tokens);
}

}  // namespace moeserve::engine::testing
