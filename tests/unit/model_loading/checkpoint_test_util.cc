#include "tests/unit/model_loading/checkpoint_test_util.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "engine/model/hf_config.h"
#include "engine/model/kv_rows.h"
#include "engine/runtime/block_allocator.h"
#include "gtest/gtest.h"
#include "kernels/fp8.h"

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

Fp8BlockWeight QuantizeFp8Blocks(const std::string& name, const Tensor& weight) {
  constexpr int64_t kBlock = kernels::kFp8BlockSize;
  const int64_t rows = weight.shape[0], cols = weight.shape[1];
  const int64_t block_rows = (rows + kBlock - 1) / kBlock,
                block_cols = (cols + kBlock - 1) / kBlock;
  std::vector<float> scales(block_rows * block_cols, 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      float& scale = scales[(r / kBlock) * block_cols + c / kBlock];
      scale = std::max(scale, std::abs(weight.data[r * cols + c]) / kernels::kE4m3Max);
    }
  }
  for (float& scale : scales) {
    if (scale == 0.0f) scale = 1.0f;
  }
  Fp8BlockWeight out{{name, DType::kF8E4M3, weight.shape, std::string(rows * cols, '\0')},
                     {name + "_scale_inv", DType::kF32, {block_rows, block_cols}, {}},
                     {weight.shape, std::vector<float>(rows * cols)}};
  out.scales.bytes.assign(reinterpret_cast<const char*>(scales.data()),
                          scales.size() * sizeof(float));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const float scale = scales[(r / kBlock) * block_cols + c / kBlock];
      const uint8_t code = kernels::FloatToE4m3(weight.data[r * cols + c] / scale);
      out.codes.bytes[r * cols + c] = static_cast<char>(code);
      out.dequantized.data[r * cols + c] = Float8E4M3ToFloat(code) * scale;
    }
  }
  return out;
}

void ExpectOnDemandReadsMatch(const fs::path& folder, const Model& host_model) {
  LoadOptions on_demand;
  on_demand.host_weights = false;
  absl::StatusOr<LoadedModel> opened = LoadModel(folder.string(), on_demand);
  ASSERT_TRUE(opened.ok()) << opened.status();
  const Model& model = *opened->model;
  EXPECT_FALSE(model.has_host_weights());
  EXPECT_EQ(model.weights().tensors().size(), 0u);
  const TensorSource& source = model.tensor_source();
  const TensorSource& host = host_model.tensor_source();
  for (const auto& [name, tensor] : host_model.weights().tensors()) {
    SCOPED_TRACE(name);
    const std::vector<int64_t>* shape = source.Shape(name);
    ASSERT_NE(shape, nullptr);
    EXPECT_EQ(*shape, tensor.shape);
    std::vector<float> values(tensor.data.size());
    ASSERT_TRUE(source.ReadFloat(name, 0, values).ok());
    EXPECT_EQ(std::memcmp(values.data(), tensor.data.data(), values.size() * sizeof(float)), 0);
    // bf16 in three uneven ranges, from the checkpoint and from the host copy alike.
    const int64_t size = static_cast<int64_t>(values.size());
    for (auto [first, end] :
         {std::pair<int64_t, int64_t>{0, size / 3}, {size / 3, size - 1}, {size - 1, size}}) {
      std::vector<uint16_t> from_file(end - first), from_host(end - first);
      ASSERT_TRUE(source.ReadBf16(name, first, from_file).ok());
      ASSERT_TRUE(host.ReadBf16(name, first, from_host).ok());
      for (int64_t i = first; i < end; ++i) {
        ASSERT_EQ(from_file[i - first], FloatToBf16(tensor.data[i])) << "element " << i;
      }
      EXPECT_EQ(from_file, from_host);
    }
  }
}

absl::StatusOr<std::vector<float>> LoadAndRun(const fs::path& folder,
                                              const std::vector<int32_t>& tokens) {
  absl::StatusOr<LoadedModel> loaded = LoadModel(folder.string());
  if (!loaded.ok()) return loaded.status();
  ExpectOnDemandReadsMatch(folder, *loaded->model);
  return Logits(*loaded->model, tokens);
}

}  // namespace moeserve::engine::testing
