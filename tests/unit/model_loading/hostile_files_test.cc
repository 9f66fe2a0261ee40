// Model folders written by a hostile or careless hand: JSON nested a million levels deep in every
// file the loader parses, FIFOs in place of files, absurd sizes in config.json, and weights full
// of NaN. Each must end in a clear error naming the file or tensor, never a crash, a hang or
// gigabytes of memory.
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <future>
#include <limits>
#include <thread>

#include "absl/strings/str_cat.h"
#include "engine/model/loader.h"
#include "engine/model/rope.h"
#include "engine/model/safetensors.h"
#include "engine/placement/expert_placement.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/unit/model_loading/checkpoint_test_util.h"

namespace moeserve::engine {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using namespace testing;  // NOLINT: the test helpers

// `[[[[…]]]]` a million levels deep: a few megabytes that overflow any recursive reader. Each
// test puts it where the loader reads a value (and, before depths were bounded, copied or printed
// it for a message).
std::string DeeplyNested() {
  constexpr int kDepth = 1'000'000;
  return std::string(kDepth, '[') + std::string(kDepth, ']');
}

fs::path ValidFolder(const std::string& name,
                     const nlohmann::json& config = SmallDeepSeekV3Json()) {
  const fs::path folder = MakeTempFolder(name);
  WriteCheckpoint(folder, config, Encode(RandomWeights(config), DType::kF32));
  return folder;
}

absl::Status LoadError(const fs::path& folder) {
  absl::StatusOr<LoadedModel> loaded = LoadModel(folder.string());
  EXPECT_FALSE(loaded.ok()) << folder;
  return loaded.ok() ? absl::OkStatus() : loaded.status();
}

// A minimal byte-level tokenizer.json (the tests change one field at a time).
nlohmann::json SmallTokenizerJson() {
  nlohmann::json vocab = nlohmann::json::object();
  for (int id = 0; id < 64; ++id) vocab[std::string(1, static_cast<char>('0' + id))] = id;
  return {{"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", nlohmann::json::array()}}},
          {"pre_tokenizer", {{"type", "ByteLevel"}, {"use_regex", true}}}};
}

TEST(HostileFiles, DeeplyNestedJsonIsRefusedInEveryFile) {
  const fs::path folder = ValidFolder("deep");
  const std::string config = SmallDeepSeekV3Json().dump();

  WriteText(folder / "config.json", absl::StrCat(R"({"model_type": )", DeeplyNested(), "}"));
  absl::Status status = LoadError(folder);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("config.json` is not valid JSON: nested more than"));
  WriteText(folder / "config.json", config);

  std::string tokenizer = SmallTokenizerJson().dump();
  tokenizer.pop_back();  // the closing brace
  WriteText(folder / "tokenizer.json",
            absl::StrCat(tokenizer, R"(, "normalizer": )", DeeplyNested(), "}"));
  EXPECT_THAT(LoadError(folder).message(),
              HasSubstr("tokenizer.json` is not valid JSON: nested more than"));
  WriteText(folder / "tokenizer.json", SmallTokenizerJson().dump());
  WriteText(folder / "tokenizer_config.json",
            absl::StrCat(R"({"bos_token": )", DeeplyNested(), "}"));
  EXPECT_THAT(LoadError(folder).message(), HasSubstr("tokenizer_config.json` is not valid JSON"));
  fs::remove(folder / "tokenizer_config.json");
  fs::remove(folder / "tokenizer.json");

  // A safetensors header (8 bytes of length, then the JSON) with a tensor's shape nested deep.
  const std::string header = absl::StrCat(R"({"x": {"dtype": "F32", "shape": )", DeeplyNested(),
                                          R"(, "data_offsets": [0, 0]}})");
  std::string file(8, '\0');
  for (int i = 0; i < 8; ++i) file[i] = static_cast<char>((header.size() >> (8 * i)) & 0xFF);
  WriteText(folder / "model.safetensors", file + header);
  EXPECT_THAT(LoadError(folder).message(), HasSubstr("nested more than"));

  WriteText(folder / "model.safetensors.index.json",
            absl::StrCat(R"({"weight_map": {"x": )", DeeplyNested(), "}}"));
  EXPECT_THAT(LoadError(folder).message(), HasSubstr("nested more than"));

  WriteText(folder / "placement.json", absl::StrCat(R"({"phy2log": [[)", DeeplyNested(), "]]}"));
  absl::StatusOr<ExpertPlacement> placement =
      ExpertPlacement::LoadJsonFile((folder / "placement.json").string(), {2, 8, 8, 1});
  ASSERT_FALSE(placement.ok());
  EXPECT_THAT(placement.status().message(), HasSubstr("nested more than"));
}

// Runs LoadModel with a bounded wait. A loader that blocks on a FIFO is released by opening the
// FIFO's other end, so the test fails instead of hanging.
absl::Status LoadWithin(const fs::path& folder, const fs::path& fifo) {
  auto result = std::make_shared<std::promise<absl::Status>>();
  std::future<absl::Status> future = result->get_future();
  std::thread([folder, result] {
    absl::StatusOr<LoadedModel> loaded = LoadModel(folder.string());
    result->set_value(loaded.ok() ? absl::OkStatus() : loaded.status());
  }).detach();
  if (future.wait_for(std::chrono::seconds(30)) == std::future_status::timeout) {
    ADD_FAILURE() << "LoadModel blocked on the FIFO " << fifo;
    const int writer = ::open(fifo.c_str(), O_WRONLY | O_NONBLOCK);
    if (writer >= 0) ::close(writer);
    future.wait();
  }
  return future.get();
}

TEST(HostileFiles, FifosInPlaceOfFilesAreRefusedWithoutBlocking) {
  for (const char* name : {"config.json", "model.safetensors", "tokenizer.json"}) {
    SCOPED_TRACE(name);
    const fs::path folder = ValidFolder(absl::StrCat("fifo_", name));
    fs::remove(folder / name);
    ASSERT_EQ(::mkfifo((folder / name).c_str(), 0600), 0);
    const absl::Status status = LoadWithin(folder, folder / name);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
    EXPECT_THAT(status.message(), HasSubstr(absl::StrCat(name, "` is a FIFO, not a regular file")));
  }
}

TEST(HostileFiles, AbsurdSizesInConfigAreRefusedBeforeAllocating) {
  // Each of these used to allocate gigabytes (or abort) before any check.
  const struct {
    const char* field;
    int64_t value;
    const char* message;
  } cases[] = {
      {"num_hidden_layers", 1'000'000'000, "num_hidden_layers"},
      {"n_routed_experts", 1'000'000'000, "n_routed_experts"},
      {"max_position_embeddings", std::numeric_limits<int32_t>::max(), "max_position_embeddings"},
      {"max_position_embeddings", 100'000'000, "max_position_embeddings"},
      {"vocab_size", 1'000'000'000, "vocab_size"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(absl::StrCat(c.field, " = ", c.value));
    const fs::path folder = ValidFolder(absl::StrCat("absurd_", c.field));
    nlohmann::json config = SmallDeepSeekV3Json();
    config[c.field] = c.value;
    WriteText(folder / "config.json", config.dump());
    const absl::Status status = LoadError(folder);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
    EXPECT_THAT(status.message(), HasSubstr(c.message));
  }
}

TEST(HostileFiles, MoreLayersOrExpertsThanTheWeightsHoldNameTheFirstMissingTensor) {
  // Within the limits, but more than the checkpoint holds: the first missing tensor is named
  // without listing the rest.
  const fs::path folder = ValidFolder("more_layers");
  nlohmann::json config = SmallDeepSeekV3Json();
  config["num_hidden_layers"] = 4000;
  WriteText(folder / "config.json", config.dump());
  EXPECT_THAT(LoadError(folder).message(),
              HasSubstr("missing tensor `model.layers.3.input_layernorm.weight`"));
  config = SmallDeepSeekV3Json();
  config["n_routed_experts"] = 60000;
  config["n_group"] = 1;
  config["topk_group"] = 1;
  WriteText(folder / "config.json", config.dump());
  EXPECT_THAT(
      LoadError(folder).message(),
      HasSubstr("`model.layers.1.mlp.gate.weight` has shape [8, 32], expected [60000, 32]"));
}

TEST(HostileFiles, RotaryTablesAreSizedLazily) {
  // A context of 16M positions costs nothing until positions are used, and positions far past
  // the precomputed ones rotate exactly as the formula says.
  const int positions = 1 << 24;
  RotaryEmbedding rope(4, positions, 10000.0, RopeScaling{});
  EXPECT_LE(rope.precomputed_positions(), RotaryEmbedding::kMaxPrecomputedPositions);
  const int position = positions - 1;
  float vector[4] = {1.0f, 0.0f, 1.0f, 0.0f};
  rope.Apply(vector, position);
  for (int pair = 0; pair < 2; ++pair) {
    const float angle =
        static_cast<float>(position) * static_cast<float>(1.0 / std::pow(10000.0, 2.0 * pair / 4));
    EXPECT_FLOAT_EQ(vector[2 * pair], static_cast<float>(std::cos(angle)));
    EXPECT_FLOAT_EQ(vector[2 * pair + 1], static_cast<float>(std::sin(angle)));
  }
}

TEST(HostileFiles, NonFiniteWeightsAreRefusedNamingTheTensor) {
  const nlohmann::json config = SmallDeepSeekV3Json();
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                    -std::numeric_limits<float>::infinity()}) {
    SCOPED_TRACE(bad);
    auto weights = RandomWeights(config);
    weights["model.layers.1.mlp.experts.3.down_proj.weight"].data[7] = bad;
    const fs::path folder = MakeTempFolder("non_finite");
    WriteCheckpoint(folder, config, Encode(weights, DType::kBF16));
    const absl::Status status = LoadError(folder);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(status.message(),
                HasSubstr("tensor `model.layers.1.mlp.experts.3.down_proj.weight`"));
    EXPECT_THAT(status.message(), HasSubstr("not finite"));
  }
}

}  // namespace
}  // namespace moeserve::engine
