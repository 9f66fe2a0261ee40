// SentencePiece-style BPE tokenizer.json (Mixtral, Mistral, Llama 2): byte fallback, "▁" for
// spaces through the Prepend/Replace normalizer or the Metaspace pre-tokenizer, unknown tokens,
// and the Replace/ByteFallback/Fuse/Strip and Metaspace decoders.
//
// The parity test reads tests/fixtures/sentencepiece/ (written by
// tests/fixtures/make_sentencepiece_fixtures.py with the `tokenizers` library): for every corpus
// line of every layout, the ids, the ids with the beginning-of-sequence token, the decoded text
// (with and without special tokens) and the streamed text of the ids after a one-token prefix
// must equal the library's. The hand-made cases below are worked out in their comments.
#include <filesystem>
#include <fstream>
#include <sstream>

#include "engine/model/bpe_tokenizer.h"
#include "engine/model/loader.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/unit/model_loading/checkpoint_test_util.h"

namespace moeserve::engine {
namespace {

namespace fs = std::filesystem;

using ::testing::ElementsAre;
using ::testing::ElementsAreArray;

const fs::path kFixtures = fs::path(MOESERVE_SOURCE_DIR) / "tests" / "fixtures";
const fs::path kLayouts = kFixtures / "sentencepiece";

nlohmann::json ReadJson(const fs::path& path) {
  std::ifstream in(path);
  if (!in) {
    ADD_FAILURE() << path.string()
                  << " is missing: run tests/fixtures/make_sentencepiece_fixtures.py (see its "
                     "docstring) and commit its output";
    return nlohmann::json();
  }
  std::stringstream text;
  text << in.rdbuf();
  return nlohmann::json::parse(text.str());
}

ModelConfig ConfigWithVocabulary(int vocab_size) {
  ModelConfig config;
  config.vocab_size = vocab_size;
  return config;
}

std::unique_ptr<BpeTokenizer> Make(
    const nlohmann::json& json, int vocab_size,
    const nlohmann::json& tokenizer_config = nlohmann::json::object()) {
  absl::StatusOr<std::unique_ptr<BpeTokenizer>> tokenizer =
      BpeTokenizer::Create(json, tokenizer_config, ConfigWithVocabulary(vocab_size));
  EXPECT_TRUE(tokenizer.ok()) << tokenizer.status();
  return tokenizer.ok() ? *std::move(tokenizer) : nullptr;
}

// What a server streams for `ids`: each token's bytes through the UTF-8 stream decoder.
std::string Streamed(const Tokenizer& tokenizer, const std::vector<int32_t>& ids) {
  Utf8StreamDecoder decoder;
  std::string text;
  for (int32_t id : ids) text += decoder.Push(tokenizer.TokenBytes(id));
  return text + decoder.Flush();
}

TEST(SentencePieceTokenizer, EveryLayoutEncodesAndDecodesLikeTheTokenizersLibrary) {
  const nlohmann::json manifest = ReadJson(kLayouts / "cases.json");
  ASSERT_TRUE(manifest.is_object());
  ASSERT_EQ(manifest["layouts"].size(), 5u);
  int cases = 0;
  for (const auto& [name, layout] : manifest["layouts"].items()) {
    SCOPED_TRACE(name);
    const nlohmann::json json = ReadJson(kLayouts / name / "tokenizer.json");
    const nlohmann::json tokenizer_config = ReadJson(kLayouts / name / "tokenizer_config.json");
    const int vocab_size = layout["vocab_size"];
    // The beginning-of-sequence token from the post-processor's template, and from
    // tokenizer_config.json's add_bos_token as LoadModel reads it: the same ids either way.
    auto from_template = Make(json, vocab_size);
    auto from_config = Make(json, vocab_size, tokenizer_config);
    ASSERT_NE(from_template, nullptr);
    ASSERT_NE(from_config, nullptr);
    const std::vector<int32_t> prefix = layout["continuation_prefix"];
    for (const nlohmann::json& example : layout["cases"]) {
      const std::string text = example["text"];
      SCOPED_TRACE(text);
      const std::vector<int32_t> ids = example["ids"];
      const std::vector<int32_t> with_special = example["ids_with_special_tokens"];
      absl::StatusOr<std::vector<int32_t>> encoded = from_template->EncodeWithoutBos(text);
      ASSERT_TRUE(encoded.ok()) << encoded.status();
      EXPECT_EQ(*encoded, ids);
      EXPECT_EQ(*from_template->Encode(text), with_special);
      EXPECT_EQ(*from_config->Encode(text), with_special);
      EXPECT_EQ(from_template->Decode(ids), example["decoded"].get<std::string>());
      EXPECT_EQ(from_template->Decode(with_special, /*skip_special_tokens=*/false),
                example["decoded_with_special_tokens"].get<std::string>());
      // Generated tokens stream the text they add after what came before.
      EXPECT_EQ(Streamed(*from_template, ids), example["continuation"].get<std::string>());
      std::vector<int32_t> after_prefix = prefix;
      after_prefix.insert(after_prefix.end(), ids.begin(), ids.end());
      EXPECT_EQ(from_template->Decode(after_prefix),
                from_template->Decode(prefix) + example["continuation"].get<std::string>());
      ++cases;
    }
  }
  EXPECT_GE(cases, 5 * 30);
}

// A hand-made Mixtral-layout tokenizer: <unk> 0, <s> 1, </s> 2, byte b is <0xBB> = 3 + b, then
// ▁ 259, h 260, i 261, ▁h 262 (merge rank 0), ▁hi 263 (rank 1).
constexpr int kByteBase = 3;
nlohmann::json HandMadeMixtral() {
  nlohmann::json vocab = {{"<unk>", 0}, {"<s>", 1}, {"</s>", 2}};
  for (int byte = 0; byte < 256; ++byte) {
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", byte);
    vocab[name] = kByteBase + byte;
  }
  vocab["▁"] = 259;
  vocab["h"] = 260;
  vocab["i"] = 261;
  vocab["▁h"] = 262;
  vocab["▁hi"] = 263;
  auto special = [](int id, const char* content) {
    return nlohmann::json{{"id", id},        {"content", content}, {"single_word", false},
                          {"lstrip", false}, {"rstrip", false},    {"normalized", false},
                          {"special", true}};
  };
  return {
      {"version", "1.0"},
      {"added_tokens", {special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")}},
      {"normalizer",
       {{"type", "Sequence"},
        {"normalizers",
         {{{"type", "Prepend"}, {"prepend", "▁"}},
          {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", "▁"}}}}}},
      {"pre_tokenizer", nullptr},
      {"post_processor", nullptr},
      {"decoder",
       {{"type", "Sequence"},
        {"decoders",
         {{{"type", "Replace"}, {"pattern", {{"String", "▁"}}}, {"content", " "}},
          {{"type", "ByteFallback"}},
          {{"type", "Fuse"}},
          {{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}}}}}},
      {"model",
       {{"type", "BPE"},
        {"unk_token", "<unk>"},
        {"fuse_unk", true},
        {"byte_fallback", true},
        {"vocab", vocab},
        {"merges", {"▁ h", "▁h i"}}}},
  };
}

TEST(SentencePieceTokenizer, CharactersOutsideTheVocabularyFallBackToTheirBytes) {
  auto tokenizer = Make(HandMadeMixtral(), 300);
  ASSERT_NE(tokenizer, nullptr);
  // "hi 日" → normalized "▁hi▁日": ▁ h i merge to ▁hi; 日 (E6 97 A5) is not in the vocabulary.
  EXPECT_THAT(*tokenizer->EncodeWithoutBos("hi 日"),
              ElementsAre(263, 259, kByteBase + 0xE6, kByteBase + 0x97, kByteBase + 0xA5));
  // Decoding joins the byte tokens back into the character and drops the prepended space.
  EXPECT_EQ(tokenizer->Decode({263, 259, kByteBase + 0xE6, kByteBase + 0x97, kByteBase + 0xA5}),
            "hi 日");
  // Byte tokens that are not valid UTF-8 decode to one U+FFFD per byte, as in the library...
  EXPECT_EQ(tokenizer->Decode({263, kByteBase + 0xE6, kByteBase + 0x97}), "hi\uFFFD\uFFFD");
  // ...while streaming keeps the raw bytes, so the next token can complete the character.
  EXPECT_EQ(tokenizer->TokenBytes(kByteBase + 0xE6), "\xE6");
  EXPECT_EQ(tokenizer->TokenBytes(263), " hi");  // mid-text, the space is kept
  EXPECT_EQ(tokenizer->TokenBytes(1), "");       // special tokens stream nothing
  // Special tokens are cut out before normalizing, so each stretch gets its own "▁".
  EXPECT_THAT(*tokenizer->EncodeWithoutBos("<s>hi</s>hi"), ElementsAre(1, 263, 2, 263));
}

TEST(SentencePieceTokenizer, UnknownCharactersWithoutByteFallback) {
  nlohmann::json json = HandMadeMixtral();
  json["model"]["byte_fallback"] = false;
  auto fused = Make(json, 300);
  ASSERT_NE(fused, nullptr);
  // 日 and 本 are unknown: one <unk> for the run with fuse_unk.
  EXPECT_THAT(*fused->EncodeWithoutBos("hi 日本"), ElementsAre(263, 259, 0));
  json["model"]["fuse_unk"] = false;
  auto unfused = Make(json, 300);
  EXPECT_THAT(*unfused->EncodeWithoutBos("hi 日本"), ElementsAre(263, 259, 0, 0));
  // No unknown token at all: unknown characters are dropped, as the library drops them.
  json["model"].erase("unk_token");
  auto dropping = Make(json, 300);
  EXPECT_THAT(*dropping->EncodeWithoutBos("hi 日本"), ElementsAre(263, 259));
}

TEST(SentencePieceTokenizer, PartialByteTokensKeepTheLibrarysOrder) {
  // Only ASCII byte tokens: "x" falls back to <0x78>, "日" has no byte tokens, so it is <unk>.
  // The library places a pending <unk> only when a vocabulary character follows, so "x日y"
  // encodes (checked with tokenizers 0.23) as ▁ <0x78> <0x79> <unk>, not in text order.
  nlohmann::json json = HandMadeMixtral();
  for (int byte = 0x80; byte < 256; ++byte) {
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", byte);
    json["model"]["vocab"].erase(name);
  }
  auto tokenizer = Make(json, 300);
  ASSERT_NE(tokenizer, nullptr);
  EXPECT_THAT(*tokenizer->EncodeWithoutBos("x日y"),
              ElementsAre(259, kByteBase + 'x', kByteBase + 'y', 0));
  EXPECT_THAT(*tokenizer->EncodeWithoutBos("日h"), ElementsAre(259, 0, 260));
}

TEST(SentencePieceTokenizer, MetaspacePrependSchemes) {
  nlohmann::json json = HandMadeMixtral();
  json["normalizer"] = nullptr;
  json["decoder"] = {{"type", "Metaspace"}, {"replacement", "▁"}, {"prepend_scheme", "first"}};
  // "first": only the stretch that starts the text gets a "▁" in front.
  json["pre_tokenizer"] = {
      {"type", "Metaspace"}, {"replacement", "▁"}, {"prepend_scheme", "first"}, {"split", false}};
  auto first = Make(json, 300);
  ASSERT_NE(first, nullptr);
  EXPECT_THAT(*first->EncodeWithoutBos("hi<s>hi"), ElementsAre(263, 1, 260, 261));
  // The Metaspace decoder drops the replacement characters of the first token only.
  EXPECT_EQ(first->Decode({263, 263}), "hi hi");
  json["pre_tokenizer"]["prepend_scheme"] = "always";
  auto always = Make(json, 300);
  EXPECT_THAT(*always->EncodeWithoutBos("hi<s>hi"), ElementsAre(263, 1, 263));
  json["pre_tokenizer"]["prepend_scheme"] = "never";
  auto never = Make(json, 300);
  EXPECT_THAT(*never->EncodeWithoutBos("hi hi"), ElementsAre(260, 261, 263));
  // The older spelling: add_prefix_space false means never.
  json["pre_tokenizer"].erase("prepend_scheme");
  json["pre_tokenizer"]["add_prefix_space"] = false;
  auto legacy = Make(json, 300);
  EXPECT_THAT(*legacy->EncodeWithoutBos("hi hi"), ElementsAre(260, 261, 263));
}

TEST(SentencePieceTokenizer, AMegabyteWithoutPreTokenizerEncodesInOneWord) {
  // Mixtral's layout has no pre-tokenizer: the whole text is one word for the merges, which
  // must therefore not be quadratic in its length.
  auto tokenizer = Make(HandMadeMixtral(), 300);
  ASSERT_NE(tokenizer, nullptr);
  std::string text;
  while (text.size() < (1 << 20)) text += "hi ";
  const absl::StatusOr<std::vector<int32_t>> ids = tokenizer->EncodeWithoutBos(text);
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_EQ(ids->size(), text.size() / 3 + 1);  // ▁hi per word, and the trailing ▁
}

TEST(SentencePieceTokenizer, MixtralCheckpointLoadsItsTokenizerThroughLoadModel) {
  // The tiny Mixtral checkpoint of tests/fixtures/hf/ with the 320-token SentencePiece
  // tokenizer made for its vocabulary, as a Mixtral folder holds them.
  const fs::path folder = testing::MakeTempFolder("mixtral_with_tokenizer");
  for (const char* file : {"config.json", "model.safetensors"}) {
    fs::copy_file(kFixtures / "hf" / "mixtral" / file, folder / file);
  }
  for (const char* file : {"tokenizer.json", "tokenizer_config.json"}) {
    fs::copy_file(kLayouts / "mixtral_320" / file, folder / file);
  }
  absl::StatusOr<LoadedModel> loaded = LoadModel(folder.string());
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  ASSERT_NE(loaded->tokenizer, nullptr);
  const nlohmann::json manifest = ReadJson(kLayouts / "cases.json");
  for (const nlohmann::json& example : manifest["layouts"]["mixtral_320"]["cases"]) {
    const std::string text = example["text"];
    SCOPED_TRACE(text);
    EXPECT_THAT(*loaded->tokenizer->Encode(text),
                ElementsAreArray(example["ids_with_special_tokens"].get<std::vector<int32_t>>()));
  }
}

}  // namespace
}  // namespace moeserve::engine
