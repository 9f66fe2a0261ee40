// Parity with Hugging Face transformers on the fixtures that tests/fixtures/make_hf_fixtures.py
// writes to tests/fixtures/hf/: the served model's greedy tokens (temperature 0, ignore_eos,
// through the running server) equal transformers' 16 greedy tokens, GetModelInfo names the
// architecture, and the tokenizer.json fixture encodes like the `tokenizers` library. The Mixtral
// fixture, given the SentencePiece-style tokenizer of tests/fixtures/sentencepiece/mixtral_320/,
// serves text.
// (tests/reference/check_hf_fixtures.py compares `moeserve logits` with the reference logits.)
// A missing fixture folder fails the tests: they must not pass by running nothing.
#include <filesystem>
#include <fstream>
#include <sstream>

#include "engine/model/bpe_tokenizer.h"
#include "engine/model/loader.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "moeserve/v1/generation.grpc.pb.h"
#include "nlohmann/json.hpp"
#include "tests/integration/server_process.h"

namespace moeserve::engine {
namespace {

namespace fs = std::filesystem;

const fs::path kFixtures = fs::path(MOESERVE_SOURCE_DIR) / "tests" / "fixtures" / "hf";

nlohmann::json Manifest() {
  std::ifstream in(kFixtures / "manifest.json");
  if (!in) {
    ADD_FAILURE() << (kFixtures / "manifest.json").string()
                  << " is missing: run tests/fixtures/make_hf_fixtures.py tests/fixtures/hf on a "
                     "machine with torch and transformers, and commit its output";
    return nlohmann::json();
  }
  std::stringstream text;
  text << in.rdbuf();
  return nlohmann::json::parse(text.str());
}

nlohmann::json ReadJson(const fs::path& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return nlohmann::json::parse(text.str());
}

TEST(HfFixtures, GreedyGenerationThroughTheServerMatchesTransformers) {
  const nlohmann::json manifest = Manifest();
  ASSERT_TRUE(manifest.is_object());
  ASSERT_FALSE(manifest["fixtures"].empty());
  for (const nlohmann::json& fixture : manifest["fixtures"]) {
    const std::string name = fixture["name"];
    SCOPED_TRACE(name);
    const fs::path folder = kFixtures / fixture["folder"].get<std::string>();
    const nlohmann::json reference = ReadJson(folder / "reference_greedy.json");
    moeserve::testing::ServerProcess server({"--model", folder.string()});
    ASSERT_TRUE(server.ok()) << server.output();
    auto stub = v1::Generation::NewStub(server.channel());

    grpc::ClientContext info_context;
    v1::ModelInfo info;
    ASSERT_TRUE(stub->GetModelInfo(&info_context, v1::GetModelInfoRequest(), &info).ok());
    EXPECT_EQ(info.architecture(), fixture["model_type"].get<std::string>());
    EXPECT_EQ(info.name(), fixture["folder"].get<std::string>());

    v1::GenerateRequest request;
    for (int id : reference["prompt_tokens"]) request.mutable_token_ids()->add_ids(id);
    request.set_max_tokens(static_cast<uint32_t>(reference["greedy_tokens"].size()));
    request.mutable_sampling()->set_temperature(0.0f);
    request.set_ignore_eos(true);
    grpc::ClientContext context;
    auto reader = stub->Generate(&context, request);
    std::vector<int> tokens;
    v1::GenerateResponse response;
    while (reader->Read(&response)) {
      for (uint32_t id : response.token_ids()) tokens.push_back(static_cast<int>(id));
    }
    ASSERT_TRUE(reader->Finish().ok());
    EXPECT_EQ(tokens, reference["greedy_tokens"].get<std::vector<int>>())
        << "smallest top-2 logit margin in the reference: " << reference["min_top2_margin"];
  }
}

TEST(HfFixtures, TokenizerEncodesLikeTheTokenizersLibrary) {
  const nlohmann::json manifest = Manifest();
  ASSERT_TRUE(manifest.is_object());
  ASSERT_TRUE(manifest.contains("tokenizer"));
  const fs::path folder = kFixtures / manifest["tokenizer"]["folder"].get<std::string>();
  absl::StatusOr<LoadedModel> loaded = LoadModel(folder.string());
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  auto* tokenizer = dynamic_cast<const BpeTokenizer*>(loaded->tokenizer.get());
  ASSERT_NE(tokenizer, nullptr);
  ASSERT_FALSE(manifest["tokenizer"]["cases"].empty());
  for (const nlohmann::json& example : manifest["tokenizer"]["cases"]) {
    const std::string text = example["text"];
    SCOPED_TRACE(text);
    const std::vector<int32_t> ids = *tokenizer->EncodeWithoutBos(text);
    EXPECT_EQ(ids, example["ids"].get<std::vector<int32_t>>());
    std::string decoded;
    for (int32_t id : ids) decoded += tokenizer->TokenBytes(id);
    // Special tokens decode to nothing in moeserve; the library's text keeps them.
    std::string expected = example["decoded"];
    for (const char* special : {"<|im_start|>", "<|im_end|>", "<|endoftext|>"}) {
      for (size_t at = expected.find(special); at != std::string::npos;
           at = expected.find(special)) {
        expected.erase(at, std::string(special).size());
      }
    }
    EXPECT_EQ(decoded, expected);
  }
}

TEST(HfFixtures, MixtralWithItsSentencePieceTokenizerServesText) {
  // The Mixtral fixture with the Mixtral-layout tokenizer.json made for its 320-token vocabulary
  // (tests/fixtures/make_sentencepiece_fixtures.py), as a Mixtral folder holds them.
  const fs::path folder = fs::path(::testing::TempDir()) / "mixtral_served_with_text";
  fs::remove_all(folder);
  fs::create_directories(folder);
  for (const char* file : {"config.json", "model.safetensors"}) {
    fs::copy_file(kFixtures / "mixtral" / file, folder / file);
  }
  const fs::path tokenizer_folder = kFixtures.parent_path() / "sentencepiece" / "mixtral_320";
  for (const char* file : {"tokenizer.json", "tokenizer_config.json"}) {
    fs::copy_file(tokenizer_folder / file, folder / file);
  }
  absl::StatusOr<LoadedModel> loaded = LoadModel(folder.string());
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  ASSERT_NE(loaded->tokenizer, nullptr);
  const std::string prompt = "Hello world, grüß dich 日本";
  const std::vector<int32_t> prompt_ids = *loaded->tokenizer->Encode(prompt);

  moeserve::testing::ServerProcess server({"--model", folder.string()});
  ASSERT_TRUE(server.ok()) << server.output();
  auto stub = v1::Generation::NewStub(server.channel());
  grpc::ClientContext info_context;
  v1::ModelInfo info;
  ASSERT_TRUE(stub->GetModelInfo(&info_context, v1::GetModelInfoRequest(), &info).ok());
  EXPECT_TRUE(info.has_tokenizer());

  v1::GenerateRequest request;
  request.set_text(prompt);
  request.set_max_tokens(12);
  request.mutable_sampling()->set_temperature(0.0f);
  request.set_ignore_eos(true);
  grpc::ClientContext context;
  auto reader = stub->Generate(&context, request);
  std::vector<int32_t> tokens;
  std::string text;
  uint32_t prompt_tokens = 0;
  v1::GenerateResponse response;
  while (reader->Read(&response)) {
    for (uint32_t id : response.token_ids()) tokens.push_back(static_cast<int32_t>(id));
    text += response.text();
    if (response.has_usage()) prompt_tokens = response.usage().prompt_tokens();
  }
  const grpc::Status status = reader->Finish();
  ASSERT_TRUE(status.ok()) << status.error_message();
  // The prompt was tokenized with the beginning-of-sequence token, as add_bos_token says.
  EXPECT_EQ(prompt_tokens, prompt_ids.size());
  ASSERT_EQ(tokens.size(), 12u);
  // The streamed text is the generated tokens' text after the prompt: the bytes of each token
  // (byte tokens joined into characters), "▁" as a space.
  Utf8StreamDecoder decoder;
  std::string expected;
  for (int32_t id : tokens) expected += decoder.Push(loaded->tokenizer->TokenBytes(id));
  expected += decoder.Flush();
  EXPECT_EQ(text, expected);
  EXPECT_EQ(text.find("\xE2\x96\x81"), std::string::npos);  // no "▁" left in the text
}

}  // namespace
}  // namespace moeserve::engine
