// Checkpoints opened without host weights (LoadOptions::host_weights off, as a GPU engine loads
// them): reads by name and range, their errors, a corrupt value found when it is read, the CPU
// engine refusing such a model, and resident memory staying bounded while a large checkpoint is
// streamed through a small buffer. (Every stored layout reading equal to the host copy is
// checked by the checkpoint-loading tests, through ExpectOnDemandReadsMatch.)
#include <cstring>
#include <fstream>
#include <limits>
#include <string>

#include "absl/strings/numbers.h"
#include "engine/engine.h"
#include "engine/model/checkpoint.h"
#include "engine/model/hf_config.h"
#include "engine/model/loader.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/unit/model_loading/checkpoint_test_util.h"

namespace moeserve::engine {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using namespace testing;  // NOLINT: the test helpers

absl::StatusOr<LoadedModel> OpenOnDemand(const fs::path& folder) {
  LoadOptions options;
  options.host_weights = false;
  return LoadModel(folder.string(), options);
}

TEST(OnDemandLoading, RangesOutsideATensorAndUnknownNamesAreErrors) {
  const nlohmann::json config = SmallDeepSeekV3Json();
  const fs::path folder = MakeTempFolder("ranges");
  WriteCheckpoint(folder, config, Encode(RandomWeights(config), DType::kBF16));
  absl::StatusOr<LoadedModel> opened = OpenOnDemand(folder);
  ASSERT_TRUE(opened.ok()) << opened.status();
  absl::StatusOr<LoadedModel> host = LoadModel(folder.string());
  ASSERT_TRUE(host.ok()) << host.status();
  for (const TensorSource* source :
       {&opened->model->tensor_source(), &host->model->tensor_source()}) {
    const std::string norm = "model.norm.weight";  // [32]
    std::vector<float> values(8);
    EXPECT_TRUE(source->ReadFloat(norm, 24, values).ok());
    EXPECT_EQ(source->ReadFloat(norm, 25, values).code(), absl::StatusCode::kOutOfRange);
    EXPECT_EQ(source->ReadFloat(norm, -1, values).code(), absl::StatusCode::kOutOfRange);
    std::vector<uint16_t> bits(1);
    EXPECT_EQ(source->ReadBf16(norm, 32, bits).code(), absl::StatusCode::kOutOfRange);
    const absl::Status unknown = source->ReadBf16("model.layers.0.mlp.nothing.weight", 0, bits);
    EXPECT_EQ(unknown.code(), absl::StatusCode::kNotFound);
    EXPECT_THAT(unknown.message(), HasSubstr("`model.layers.0.mlp.nothing.weight`"));
    EXPECT_EQ(source->Shape("model.layers.0.mlp.nothing.weight"), nullptr);
  }
}

TEST(OnDemandLoading, ACorruptValueFailsTheReadThatMeetsIt) {
  const nlohmann::json config = SmallDeepSeekV3Json();
  auto weights = RandomWeights(config);
  const std::string corrupt = "model.layers.1.mlp.experts.3.down_proj.weight";
  weights[corrupt].data[70] = std::numeric_limits<float>::quiet_NaN();
  const fs::path folder = MakeTempFolder("corrupt");
  WriteCheckpoint(folder, config, Encode(weights, DType::kBF16));
  // Opening reads no values; the tensor's other ranges and other tensors read normally.
  absl::StatusOr<LoadedModel> opened = OpenOnDemand(folder);
  ASSERT_TRUE(opened.ok()) << opened.status();
  const TensorSource& source = opened->model->tensor_source();
  std::vector<uint16_t> bits(64);
  EXPECT_TRUE(source.ReadBf16(corrupt, 0, bits).ok());
  EXPECT_TRUE(source.ReadBf16("model.layers.1.mlp.experts.2.down_proj.weight", 64, bits).ok());
  const absl::Status status = source.ReadBf16(corrupt, 64, bits);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("tensor `" + corrupt + "`"));
  EXPECT_THAT(status.message(), HasSubstr("not finite"));
  EXPECT_THAT(status.message(), HasSubstr("at element 70"));
}

TEST(OnDemandLoading, TheCpuEngineRefusesAModelWithoutHostWeights) {
  const nlohmann::json config = SmallQwen3MoeJson();
  const fs::path folder = MakeTempFolder("no_host_weights");
  WriteCheckpoint(folder, config, Encode(RandomWeights(config), DType::kF32));
  absl::StatusOr<LoadedModel> opened = OpenOnDemand(folder);
  ASSERT_TRUE(opened.ok()) << opened.status();
  EngineOptions options;
  options.device = "cpu";
  absl::StatusOr<std::unique_ptr<Engine>> engine =
      Engine::CreateWithModel(opened->model, opened->tokenizer, options);
  ASSERT_FALSE(engine.ok());
  EXPECT_EQ(engine.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(engine.status().message(), HasSubstr("not in host memory"));
}

TEST(OnDemandLoading, Fp8BlockWeightsAreReadAsStored) {
  // Experts in FP8 with 128x128 blocks (a 256 x 160 weight: 2 x 2 blocks, partial ones), as a
  // GPU serves them; the values the same tensors read as (code * scale) are what the CPU uses.
  nlohmann::json config = SmallDeepSeekV3Json();
  config["hidden_size"] = 160;
  config["moe_intermediate_size"] = 256;
  config["quantization_config"] = {{"quant_method", "fp8"}, {"weight_block_size", {128, 128}}};
  std::map<std::string, Tensor> weights = RandomWeights(config);
  const std::string name = "model.layers.1.mlp.experts.3.gate_proj.weight";  // [256, 160]
  std::vector<EncodedTensor> stored;
  Fp8BlockWeight fp8 = QuantizeFp8Blocks(name, weights.at(name));
  for (const auto& [tensor_name, tensor] : weights) {
    if (tensor_name != name) stored.push_back(Encode({{tensor_name, tensor}}, DType::kBF16)[0]);
  }
  stored.push_back(fp8.codes);
  stored.push_back(fp8.scales);
  const fs::path folder = MakeTempFolder("fp8_blocks");
  WriteCheckpoint(folder, config, stored);
  absl::StatusOr<LoadedModel> opened = OpenOnDemand(folder);
  ASSERT_TRUE(opened.ok()) << opened.status();
  const TensorSource& source = opened->model->tensor_source();
  EXPECT_TRUE(source.StoredAsFp8Blocks(name));
  EXPECT_FALSE(source.StoredAsFp8Blocks("model.layers.1.mlp.experts.3.up_proj.weight"));
  std::vector<uint8_t> codes(256 * 160);
  ASSERT_TRUE(source.ReadFp8Codes(name, 0, codes).ok());
  EXPECT_EQ(std::string(codes.begin(), codes.end()), fp8.codes.bytes);
  std::vector<uint8_t> tail(100);
  ASSERT_TRUE(source.ReadFp8Codes(name, 256 * 160 - 100, tail).ok());
  EXPECT_EQ(std::string(tail.begin(), tail.end()), fp8.codes.bytes.substr(256 * 160 - 100));
  std::vector<float> scales(4);
  ASSERT_TRUE(source.ReadFp8Scales(name, scales).ok());
  EXPECT_EQ(std::memcmp(scales.data(), fp8.scales.bytes.data(), 16), 0);
  std::vector<float> values(256 * 160);
  ASSERT_TRUE(source.ReadFloat(name, 0, values).ok());
  EXPECT_EQ(values, fp8.dequantized.data);
  // An unknown name is NOT_FOUND; a tensor stored otherwise, and the host weights, have no FP8
  // form.
  EXPECT_EQ(source.ReadFp8Codes("model.layers.0.mlp.nothing.weight", 0, tail).code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(source.ReadFp8Scales("model.layers.0.mlp.nothing.weight", scales).code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(source.ReadFp8Codes("model.norm.weight", 0, tail).code(),
            absl::StatusCode::kFailedPrecondition);
  absl::StatusOr<LoadedModel> host = LoadModel(folder.string());
  ASSERT_TRUE(host.ok()) << host.status();
  EXPECT_FALSE(host->model->tensor_source().StoredAsFp8Blocks(name));
  EXPECT_EQ(host->model->tensor_source().ReadFp8Scales(name, scales).code(),
            absl::StatusCode::kFailedPrecondition);

  // Blocks other than 128 x 128 are read as values only; a NaN code is corrupt.
  nlohmann::json small_blocks = config;
  small_blocks["quantization_config"]["weight_block_size"] = {64, 64};
  std::vector<EncodedTensor> rescaled = stored;
  rescaled.back().shape = {4, 3};
  rescaled.back().bytes = std::string(12 * sizeof(float), '\0');
  for (int i = 0; i < 12; ++i) {
    const float one = 1.0f;
    std::memcpy(rescaled.back().bytes.data() + i * sizeof(float), &one, sizeof(float));
  }
  WriteCheckpoint(folder, small_blocks, rescaled);
  opened = OpenOnDemand(folder);
  ASSERT_TRUE(opened.ok()) << opened.status();
  EXPECT_FALSE(opened->model->tensor_source().StoredAsFp8Blocks(name));
  stored[stored.size() - 2].bytes[500] = static_cast<char>(0x7f);
  WriteCheckpoint(folder, config, stored);
  opened = OpenOnDemand(folder);
  ASSERT_TRUE(opened.ok()) << opened.status();
  const absl::Status nan = opened->model->tensor_source().ReadFp8Codes(name, 0, codes);
  EXPECT_EQ(nan.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(nan.message(), HasSubstr("not finite (nan at element 500)"));
}

// This process's resident memory (VmRSS), in bytes.
int64_t ResidentBytes() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (!line.starts_with("VmRSS:")) continue;
    int64_t kib = 0;
    std::string number = line.substr(6, line.find("kB") - 6);
    number.erase(0, number.find_first_not_of(" \t"));
    number.erase(number.find_last_not_of(" \t") + 1);
    EXPECT_TRUE(absl::SimpleAtoi(number, &kib)) << line;
    return kib * 1024;
  }
  ADD_FAILURE() << "no VmRSS in /proc/self/status";
  return 0;
}

TEST(OnDemandLoading, StreamingACheckpointKeepsResidentMemoryBounded) {
  // One 256 MiB bf16 tensor read through a 16 MiB buffer: pages that have been read go back to
  // the kernel, so resident memory grows by about the buffer, not by the file.
  const nlohmann::json config = SmallDeepSeekV3Json();
  absl::StatusOr<ModelConfig> parsed = ParseModelConfig(config, "streamed");
  ASSERT_TRUE(parsed.ok());
  constexpr int64_t kRows = 32768, kCols = 4096;
  const fs::path folder = MakeTempFolder("streamed");
  {
    EncodedTensor big{"model.embed_tokens.weight", DType::kBF16, {kRows, kCols}, {}};
    big.bytes.resize(kRows * kCols * 2);
    for (int64_t i = 0; i < kRows * kCols; ++i) {
      const uint16_t bits = FloatToBf16(static_cast<float>(i % 1000) * 0.001f);
      big.bytes[2 * i] = static_cast<char>(bits & 0xFF);
      big.bytes[2 * i + 1] = static_cast<char>(bits >> 8);
    }
    WriteCheckpoint(folder, config, {big});
  }
  absl::StatusOr<std::shared_ptr<const Checkpoint>> checkpoint =
      Checkpoint::Open(folder.string(), *parsed, config);
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  std::vector<uint16_t> buffer(int64_t{8} << 20);  // 16 MiB
  const int64_t before = ResidentBytes();
  int64_t peak = before;
  for (int64_t first = 0; first < kRows * kCols; first += static_cast<int64_t>(buffer.size())) {
    ASSERT_TRUE(ReadBf16InParallel(**checkpoint, "model.embed_tokens.weight", first, buffer).ok());
    ASSERT_EQ(buffer[12345], FloatToBf16(static_cast<float>((first + 12345) % 1000) * 0.001f));
    peak = std::max(peak, ResidentBytes());
  }
  const int64_t growth = peak - before;
  RecordProperty("resident_growth_bytes", std::to_string(growth));
  EXPECT_LT(growth, int64_t{64} << 20)
      << "resident memory grew by " << growth << " bytes while streaming 256 MiB";
}

}  // namespace
}  // namespace moeserve::engine
