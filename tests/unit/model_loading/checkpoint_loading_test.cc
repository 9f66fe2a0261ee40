// Loading checkpoint folders with LoadModel: every stored form of the same weights (F32, BF16,
// F16, FP8 with block scales, one file or shards, per-expert or fused experts, Mixtral names)
// gives the same logits as the weights themselves, the F32 export of a built-in model is
// bit-identical to it, and every malformed folder gets a clear error.
#include <cstring>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "engine/model/hf_config.h"
#include "engine/model/loader.h"
#include "engine/model/safetensors.h"
#include "engine/runtime/block_allocator.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/unit/model_loading/checkpoint_test_util.h"

namespace moeserve::engine {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using namespace testing;  // NOLINT: the test helpers

const std::vector<int32_t> kTokens = {0, 5, 17, 33, 2, 63, 40, 9, 9, 12, 1, 50};

// Logits of a model built directly from `tensors` (no file involved).
std::vector<float> DirectLogits(const nlohmann::json& config_json,
                                std::map<std::string, Tensor> tensors) {
  absl::StatusOr<ModelConfig> config = ParseModelConfig(config_json, "direct");
  EXPECT_TRUE(config.ok()) << config.status();
  absl::StatusOr<ModelWeights> weights = ModelWeights::FromTensors(*config, std::move(tensors));
  EXPECT_TRUE(weights.ok()) << weights.status();
  return Logits(Model(*std::move(weights)), kTokens);
}

void ExpectBitIdentical(const std::vector<float>& a, const std::vector<float>& b) {
  ASSERT_EQ(a.size(), b.size());
  EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0);
}

TEST(LoadCheckpoint, ExportOfBuiltinTinyIsBitIdentical) {
  absl::StatusOr<LoadedModel> builtin = LoadModel("builtin:tiny");
  ASSERT_TRUE(builtin.ok());
  const fs::path folder = MakeTempFolder("tiny");
  const ModelWeights& weights = builtin->model->weights();
  WriteText(folder / "config.json", ModelConfigToJson(weights.config()).dump(2));
  ASSERT_TRUE(WriteSafetensors((folder / "model.safetensors").string(), weights.tensors()).ok());
  absl::StatusOr<LoadedModel> loaded = LoadModel(folder.string());
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(loaded->model->config().name, "tiny");
  EXPECT_EQ(loaded->tokenizer, nullptr);  // no tokenizer.json: token ids only
  const std::vector<int32_t> tokens = {256, 72,  101, 108, 108, 111, 44,
                                       32,  119, 111, 114, 108, 100};
  ExpectBitIdentical(Logits(*builtin->model, tokens), Logits(*loaded->model, tokens));
}

struct DTypeCase {
  const char* name;
  DType dtype;
};

class StoredDTypes : public ::testing::TestWithParam<DTypeCase> {};

TEST_P(StoredDTypes, LoadedLogitsEqualThoseOfTheRoundedWeights) {
  for (const nlohmann::json& config :
       {SmallDeepSeekV3Json(), SmallQwen3MoeJson(), SmallMixtralJson()}) {
    SCOPED_TRACE(config["model_type"].get<std::string>());
    const std::map<std::string, Tensor> weights = RandomWeights(config);
    const fs::path folder = MakeTempFolder(config["model_type"].get<std::string>());
    WriteCheckpoint(folder, config, Encode(weights, GetParam().dtype));
    absl::StatusOr<std::vector<float>> loaded = LoadAndRun(folder, kTokens);
    ASSERT_TRUE(loaded.ok()) << loaded.status();
    ExpectBitIdentical(*loaded, DirectLogits(config, RoundTo(weights, GetParam().dtype)));
  }
}

INSTANTIATE_TEST_SUITE_P(AllDTypes, StoredDTypes,
                         ::testing::Values(DTypeCase{"F32", DType::kF32},
                                           DTypeCase{"BF16", DType::kBF16},
                                           DTypeCase{"F16", DType::kF16}),
                         [](const auto& info) { return std::string(info.param.name); });

// FP8 e4m3 codes and block scales for a [rows, cols] weight: weight = fp8 * scale per block.
struct Fp8Weight {
  EncodedTensor codes;
  EncodedTensor scales;
  Tensor dequantized;
};

Fp8Weight QuantizeFp8(const std::string& name, const Tensor& weight, int block_rows,
                      int block_cols) {
  const int64_t rows = weight.shape[0], cols = weight.shape[1];
  const int64_t scale_rows = (rows + block_rows - 1) / block_rows;
  const int64_t scale_cols = (cols + block_cols - 1) / block_cols;
  Fp8Weight out{{name, DType::kF8E4M3, weight.shape, std::string(rows * cols, '\0')},
                {name + "_scale_inv", DType::kF32, {scale_rows, scale_cols}, {}},
                {weight.shape, std::vector<float>(rows * cols)}};
  std::vector<float> scales(scale_rows * scale_cols);
  for (int64_t i = 0; i < scale_rows * scale_cols; ++i)
    scales[i] = 0.01f * static_cast<float>(i % 7 + 1);
  out.scales.bytes.assign(reinterpret_cast<const char*>(scales.data()),
                          scales.size() * sizeof(float));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      // Any code but NaN: derived from the weight so the matrix is not degenerate.
      uint8_t code = static_cast<uint8_t>(std::bit_cast<uint32_t>(weight.data[r * cols + c]) >> 13);
      if ((code & 0x7F) == 0x7F) code ^= 1;
      out.codes.bytes[r * cols + c] = static_cast<char>(code);
      out.dequantized.data[r * cols + c] =
          Float8E4M3ToFloat(code) * scales[(r / block_rows) * scale_cols + c / block_cols];
    }
  }
  return out;
}

TEST(LoadCheckpoint, Fp8WithBlockScalesIsDequantizedPerBlock) {
  nlohmann::json config = SmallDeepSeekV3Json();
  // Blocks smaller than the matrices, so that each has several and some are partial.
  config["quantization_config"] = {
      {"quant_method", "fp8"}, {"fmt", "e4m3"}, {"weight_block_size", {16, 10}}};
  std::map<std::string, Tensor> weights = RandomWeights(config);
  std::vector<EncodedTensor> stored;
  std::map<std::string, Tensor> dequantized;
  for (const auto& [name, tensor] : weights) {
    if (tensor.shape.size() == 2 && name.ends_with("_proj.weight")) {
      Fp8Weight fp8 = QuantizeFp8(name, tensor, 16, 10);
      stored.push_back(fp8.codes);
      stored.push_back(fp8.scales);
      dequantized[name] = fp8.dequantized;
    } else {
      stored.push_back(Encode({{name, tensor}}, DType::kF32)[0]);
      dequantized[name] = tensor;
    }
  }
  const fs::path folder = MakeTempFolder("fp8");
  WriteShardedCheckpoint(folder, config, stored, 3);
  absl::StatusOr<std::vector<float>> loaded = LoadAndRun(folder, kTokens);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  ExpectBitIdentical(*loaded, DirectLogits(config, dequantized));
}

TEST(LoadCheckpoint, ShardsFusedExpertsAndMixtralNamesLoadTheSameWeights) {
  // Shards.
  {
    const nlohmann::json config = SmallQwen3MoeJson();
    const auto weights = RandomWeights(config);
    const fs::path folder = MakeTempFolder("shards");
    WriteShardedCheckpoint(folder, config, Encode(weights, DType::kF32), 4);
    absl::StatusOr<std::vector<float>> loaded = LoadAndRun(folder, kTokens);
    ASSERT_TRUE(loaded.ok()) << loaded.status();
    ExpectBitIdentical(*loaded, DirectLogits(config, weights));
  }
  // Fused experts: mlp.experts.gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I].
  for (const nlohmann::json& config : {SmallQwen3MoeJson(), SmallDeepSeekV3Json()}) {
    const auto weights = RandomWeights(config);
    std::map<std::string, Tensor> fused;
    for (const auto& [name, tensor] : weights) {
      if (name.find(".mlp.experts.") == std::string::npos) fused[name] = tensor;
    }
    absl::StatusOr<ModelConfig> parsed = ParseModelConfig(config, "fused");
    ASSERT_TRUE(parsed.ok());
    const int64_t experts = parsed->n_routed_experts, inter = parsed->moe_intermediate_size,
                  hidden = parsed->hidden_size;
    for (int layer = 0; layer < parsed->num_hidden_layers; ++layer) {
      if (!parsed->is_moe_layer(layer)) continue;
      const std::string p = absl::StrCat("model.layers.", layer, ".mlp.experts.");
      Tensor gate_up{{experts, 2 * inter, hidden}, {}}, down{{experts, hidden, inter}, {}};
      for (int e = 0; e < experts; ++e) {
        for (const char* part : {"gate_proj", "up_proj"}) {
          const auto& data = weights.at(absl::StrCat(p, e, ".", part, ".weight")).data;
          gate_up.data.insert(gate_up.data.end(), data.begin(), data.end());
        }
        const auto& data = weights.at(absl::StrCat(p, e, ".down_proj.weight")).data;
        down.data.insert(down.data.end(), data.begin(), data.end());
      }
      fused[p + "gate_up_proj"] = gate_up;
      fused[p + "down_proj"] = down;
    }
    const fs::path folder = MakeTempFolder("fused");
    WriteCheckpoint(folder, config, Encode(fused, DType::kF32));
    absl::StatusOr<std::vector<float>> loaded = LoadAndRun(folder, kTokens);
    ASSERT_TRUE(loaded.ok()) << loaded.status();
    ExpectBitIdentical(*loaded, DirectLogits(config, weights));
  }
  // Mixtral: block_sparse_moe.gate, experts.{i}.w1 (gate), w3 (up), w2 (down).
  {
    const nlohmann::json config = SmallMixtralJson();
    const auto weights = RandomWeights(config);
    std::map<std::string, Tensor> renamed;
    for (const auto& [name, tensor] : weights) {
      std::string stored = name;
      for (auto [from, to] :
           {std::pair{".mlp.", ".block_sparse_moe."}, std::pair{"gate_proj", "w1"},
            std::pair{"up_proj", "w3"}, std::pair{"down_proj", "w2"}}) {
        if (size_t at = stored.find(from); at != std::string::npos)
          stored.replace(at, strlen(from), to);
      }
      renamed[stored] = tensor;
    }
    ASSERT_TRUE(renamed.contains("model.layers.1.block_sparse_moe.experts.3.w2.weight"));
    const fs::path folder = MakeTempFolder("mixtral");
    WriteCheckpoint(folder, config, Encode(renamed, DType::kF32));
    absl::StatusOr<LoadedModel> loaded = LoadModel(folder.string());
    ASSERT_TRUE(loaded.ok()) << loaded.status();
    EXPECT_EQ(loaded->model->config().model_type, "mixtral");
    ExpectOnDemandReadsMatch(folder, *loaded->model);
    ExpectBitIdentical(Logits(*loaded->model, kTokens), DirectLogits(config, weights));
  }
}

TEST(LoadCheckpoint, GroupedQueryKvCacheRowsHoldKeysAndValuesOfEveryKvHead) {
  const nlohmann::json config = SmallQwen3MoeJson();
  const fs::path folder = MakeTempFolder("qwen");
  WriteCheckpoint(folder, config, Encode(RandomWeights(config), DType::kF32));
  absl::StatusOr<LoadedModel> loaded = LoadModel(folder.string());
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(loaded->model->kv_row_dim(), 2 * 2 * 8);  // keys + values, 2 KV heads of 8
  // Decoding one token at a time through the cache gives the same logits as one prefill.
  const std::vector<float> prefill = Logits(*loaded->model, kTokens);
  const Model& model = *loaded->model;
  KvRows cache(model.config().num_hidden_layers, 2, 16, model.kv_row_dim());
  BlockAllocator cache_blocks(cache.num_blocks());
  std::vector<int32_t> table = *cache_blocks.Allocate(2);
  const int vocab = model.config().vocab_size;
  for (size_t i = 0; i < kTokens.size(); ++i) {
    BatchSequence step{std::span<const int32_t>(&kTokens[i], 1), static_cast<int>(i), &table,
                       false};
    const std::vector<float> logits = model.Forward({&step, 1}, cache);
    for (int v = 0; v < vocab; ++v) {
      EXPECT_NEAR(logits[v], prefill[i * vocab + v],
                  1e-4f * (1 + std::abs(prefill[i * vocab + v])));
    }
  }
}

// --- Errors -------------------------------------------------------------------------------

absl::Status LoadError(const fs::path& folder) {
  absl::StatusOr<LoadedModel> loaded = LoadModel(folder.string());
  EXPECT_FALSE(loaded.ok());
  return loaded.ok() ? absl::OkStatus() : loaded.status();
}

// The same error whether the weights are read into host memory or left in the files for a GPU
// backend (every check but a value's finiteness happens before any value is read).
void ExpectError(const fs::path& folder, absl::StatusCode code, const std::string& message) {
  const absl::Status status = LoadError(folder);
  EXPECT_EQ(status.code(), code) << status;
  EXPECT_THAT(status.message(), HasSubstr(message));
  LoadOptions on_demand;
  on_demand.host_weights = false;
  absl::StatusOr<LoadedModel> opened = LoadModel(folder.string(), on_demand);
  ASSERT_FALSE(opened.ok()) << "opened without host weights: " << folder;
  EXPECT_EQ(opened.status().code(), code) << opened.status();
  EXPECT_THAT(opened.status().message(), HasSubstr(message));
}

fs::path ValidFolder(const std::string& name,
                     const nlohmann::json& config = SmallDeepSeekV3Json()) {
  const fs::path folder = MakeTempFolder(name);
  WriteCheckpoint(folder, config, Encode(RandomWeights(config), DType::kF32));
  return folder;
}

TEST(LoadCheckpointErrors, MissingFolderOrConfig) {
  ExpectError(MakeTempFolder("x") / "absent", absl::StatusCode::kNotFound,
              "neither a checkpoint folder");
  const fs::path folder = ValidFolder("no_config");
  fs::remove(folder / "config.json");
  ExpectError(folder, absl::StatusCode::kNotFound, "no config.json");
}

TEST(LoadCheckpointErrors, MalformedConfig) {
  const fs::path folder = ValidFolder("bad_config");
  WriteText(folder / "config.json", "{\"model_type\": ");
  ExpectError(folder, absl::StatusCode::kInvalidArgument, "config.json` is not valid JSON");
  nlohmann::json config = SmallDeepSeekV3Json();
  config.erase("hidden_size");
  WriteText(folder / "config.json", config.dump());
  ExpectError(folder, absl::StatusCode::kInvalidArgument, "missing `hidden_size`");
  config = SmallQwen3MoeJson();
  config["num_key_value_heads"] = 3;  // 4 heads are not a multiple of 3
  WriteText(folder / "config.json", config.dump());
  ExpectError(folder, absl::StatusCode::kInvalidArgument, "num_key_value_heads");
  config = SmallMixtralJson();
  config["hidden_act"] = "gelu";
  WriteText(folder / "config.json", config.dump());
  ExpectError(folder, absl::StatusCode::kInvalidArgument, "hidden_act");
}

// transformers 5 writes Qwen3-MoE's expert count as `num_local_experts` and the rope settings
// as `rope_parameters` (with `rope_theta` inside); both spellings give the same config.
TEST(LoadCheckpointConfig, Qwen3MoeAcceptsTransformers5Spellings) {
  nlohmann::json original = SmallQwen3MoeJson();
  original["rope_theta"] = 1e6;
  nlohmann::json newer = original;
  newer.erase("num_experts");
  newer.erase("rope_theta");
  newer["num_local_experts"] = 6;
  newer["rope_parameters"] = {{"rope_theta", 1e6}, {"rope_type", "default"}};
  absl::StatusOr<ModelConfig> a = ParseModelConfig(original, "a");
  absl::StatusOr<ModelConfig> b = ParseModelConfig(newer, "b");
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(b->n_routed_experts, 6);
  EXPECT_EQ(b->n_routed_experts, a->n_routed_experts);
  EXPECT_EQ(b->rope_theta, a->rope_theta);
  EXPECT_EQ(b->rope_scaling.type, RopeScaling::Type::kNone);

  nlohmann::json both = newer;
  both["num_experts"] = 6;  // both spellings, agreeing
  EXPECT_TRUE(ParseModelConfig(both, "both").ok());
  both["num_experts"] = 8;
  EXPECT_THAT(ParseModelConfig(both, "both").status().message(),
              HasSubstr("`num_experts` (8) and `num_local_experts` (6) disagree"));
  nlohmann::json neither = newer;
  neither.erase("num_local_experts");
  EXPECT_THAT(ParseModelConfig(neither, "neither").status().message(),
              HasSubstr("missing `num_experts` (or `num_local_experts`)"));
}

TEST(LoadCheckpointErrors, UnsupportedModelType) {
  const fs::path folder = ValidFolder("llama");
  nlohmann::json config = SmallDeepSeekV3Json();
  config["model_type"] = "llama";
  WriteText(folder / "config.json", config.dump());
  ExpectError(
      folder, absl::StatusCode::kInvalidArgument,
      "unsupported model_type `llama` (supported: deepseek_v3, deepseek_v2, qwen3_moe, mixtral)");
}

TEST(LoadCheckpointErrors, MissingExtraAndMisShapedTensors) {
  const nlohmann::json config = SmallDeepSeekV3Json();
  auto weights = RandomWeights(config);
  const fs::path folder = MakeTempFolder("tensors");

  auto missing = weights;
  missing.erase("model.layers.2.mlp.experts.5.up_proj.weight");
  WriteCheckpoint(folder, config, Encode(missing, DType::kF32));
  ExpectError(folder, absl::StatusCode::kInvalidArgument,
              "missing tensor `model.layers.2.mlp.experts.5.up_proj.weight`");

  auto extra = weights;
  extra["model.layers.0.mlp.surprise.weight"] = Tensor{{2}, {1.0f, 2.0f}};
  WriteCheckpoint(folder, config, Encode(extra, DType::kF32));
  ExpectError(folder, absl::StatusCode::kInvalidArgument,
              "unexpected tensor `model.layers.0.mlp.surprise.weight`");

  auto misshaped = weights;
  misshaped["model.norm.weight"] = Tensor{{16, 2}, std::vector<float>(32, 1.0f)};
  WriteCheckpoint(folder, config, Encode(misshaped, DType::kF32));
  ExpectError(folder, absl::StatusCode::kInvalidArgument,
              "`model.norm.weight` has shape [16, 2], expected [32]");

  auto bad_fused = weights;
  bad_fused["model.layers.1.mlp.experts.gate_up_proj"] =
      Tensor{{8, 12, 32}, std::vector<float>(8 * 12 * 32)};
  WriteCheckpoint(folder, config, Encode(bad_fused, DType::kF32));
  ExpectError(folder, absl::StatusCode::kInvalidArgument, "expected [8, 24, 32]");
}

TEST(LoadCheckpointErrors, TensorsTheEngineDoesNotRunAreSkipped) {
  // DeepSeek-V3's multi-token prediction layer (model.layers.{num_hidden_layers}) and rotary
  // inv_freq buffers are not weights of the forward pass.
  nlohmann::json config = SmallDeepSeekV3Json();
  config["num_nextn_predict_layers"] = 1;
  auto weights = RandomWeights(config);
  weights["model.layers.3.eh_proj.weight"] = Tensor{{2, 2}, {1, 2, 3, 4}};
  weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = Tensor{{2}, {1, 2}};
  const fs::path folder = MakeTempFolder("mtp");
  WriteCheckpoint(folder, config, Encode(weights, DType::kF32));
  EXPECT_TRUE(LoadModel(folder.string()).ok());
}

TEST(LoadCheckpointErrors, NoWeights) {
  const fs::path folder = ValidFolder("no_weights");
  fs::remove(folder / "model.safetensors");
  ExpectError(folder, absl::StatusCode::kNotFound,
              "no `model.safetensors` or `model.safetensors.index.json`");
}

TEST(LoadCheckpointErrors, TruncatedAndCorruptFiles) {
  const fs::path folder = ValidFolder("truncated");
  const std::string whole = ReadText(folder / "model.safetensors");
  WriteText(folder / "model.safetensors", whole.substr(0, whole.size() - 100));
  ExpectError(folder, absl::StatusCode::kInvalidArgument, "truncated");
  WriteText(folder / "model.safetensors", whole.substr(0, 5));
  ExpectError(folder, absl::StatusCode::kInvalidArgument, "truncated");
  std::string corrupt = whole;
  corrupt[8] = '#';  // the header's opening brace
  WriteText(folder / "model.safetensors", corrupt);
  ExpectError(folder, absl::StatusCode::kInvalidArgument, "header is not a JSON object");
}

TEST(LoadCheckpointErrors, BadIndex) {
  const nlohmann::json config = SmallQwen3MoeJson();
  const fs::path folder = MakeTempFolder("index");
  WriteShardedCheckpoint(folder, config, Encode(RandomWeights(config), DType::kF32), 2);
  const std::string good_index = ReadText(folder / "model.safetensors.index.json");
  ASSERT_TRUE(LoadModel(folder.string()).ok());
  nlohmann::json index = nlohmann::json::parse(good_index);

  // Missing shard.
  fs::rename(folder / "model-2-of-2.safetensors", folder / "moved.safetensors");
  ExpectError(folder, absl::StatusCode::kNotFound, "shard `model-2-of-2.safetensors`");
  fs::rename(folder / "moved.safetensors", folder / "model-2-of-2.safetensors");

  // A tensor listed in the wrong shard.
  nlohmann::json wrong = index;
  wrong["weight_map"]["model.norm.weight"] =
      index["weight_map"]["model.norm.weight"] == "model-1-of-2.safetensors"
          ? "model-2-of-2.safetensors"
          : "model-1-of-2.safetensors";
  WriteText(folder / "model.safetensors.index.json", wrong.dump());
  ExpectError(folder, absl::StatusCode::kInvalidArgument, "which does not hold it (it is in");

  // A tensor a shard holds that the index does not list.
  nlohmann::json unlisted = index;
  unlisted["weight_map"].erase("model.norm.weight");
  WriteText(folder / "model.safetensors.index.json", unlisted.dump());
  ExpectError(folder, absl::StatusCode::kInvalidArgument, "which the index does not list");

  // Malformed index files.
  WriteText(folder / "model.safetensors.index.json", "not json");
  ExpectError(folder, absl::StatusCode::kInvalidArgument, "bad index");
  WriteText(folder / "model.safetensors.index.json", R"({"weight_map": []})");
  ExpectError(folder, absl::StatusCode::kInvalidArgument, "weight_map");
  nlohmann::json escape = index;
  escape["weight_map"]["model.norm.weight"] = "../model-1-of-2.safetensors";
  WriteText(folder / "model.safetensors.index.json", escape.dump());
  ExpectError(folder, absl::StatusCode::kInvalidArgument, "not a file name in the model folder");
}

TEST(LoadCheckpointErrors, Fp8ScalesMustMatchTheirWeights) {
  const nlohmann::json config = SmallDeepSeekV3Json();
  auto weights = RandomWeights(config);
  const std::string name = "model.layers.0.mlp.down_proj.weight";  // [32, 48]: 1 x 1 blocks
  Fp8Weight fp8 = QuantizeFp8(name, weights.at(name), 128, 128);
  weights.erase(name);
  const fs::path folder = MakeTempFolder("fp8");

  std::vector<EncodedTensor> without_scale = Encode(weights, DType::kF32);
  without_scale.push_back(fp8.codes);
  WriteCheckpoint(folder, config, without_scale);
  ExpectError(folder, absl::StatusCode::kInvalidArgument,
              "has no `" + name + "_scale_inv` block scales");

  std::vector<EncodedTensor> wrong_shape = without_scale;
  EncodedTensor scale = fp8.scales;
  scale.shape = {2, 1};
  scale.bytes += scale.bytes;
  wrong_shape.push_back(scale);
  WriteCheckpoint(folder, config, wrong_shape);
  ExpectError(folder, absl::StatusCode::kInvalidArgument, "expected [1, 1] floats");

  auto unquantized = RandomWeights(config);
  std::vector<EncodedTensor> stray = Encode(unquantized, DType::kF32);
  stray.push_back(fp8.scales);
  WriteCheckpoint(folder, config, stray);
  ExpectError(folder, absl::StatusCode::kInvalidArgument, "which is not an FP8 tensor");

  nlohmann::json bad_block = config;
  bad_block["quantization_config"] = {{"weight_block_size", {0, 128}}};
  WriteCheckpoint(folder, bad_block, stray);
  ExpectError(folder, absl::StatusCode::kInvalidArgument, "weight_block_size");
}

}  // namespace
}  // namespace moeserve::engine
