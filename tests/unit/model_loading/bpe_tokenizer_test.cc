// Byte-level BPE from tokenizer.json on a hand-made vocabulary whose encodings are worked out
// by hand in the comments: merge order by rank, the pre-tokenizer's regex splits (Qwen's and
// DeepSeek-V3's patterns with Unicode classes), added and special tokens, NFC normalization,
// the beginning-of-sequence token, decoding back to bytes, and refused configurations.
#include "engine/model/bpe_tokenizer.h"

#include <filesystem>
#include <functional>

#include "absl/strings/str_cat.h"
#include "engine/model/loader.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/unit/model_loading/checkpoint_test_util.h"

namespace moeserve::engine {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

// Qwen2/Qwen3's pre-tokenizer pattern.
constexpr char kQwenPattern[] =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

// The byte-level alphabet: printable Latin-1 bytes are themselves, the other bytes map to
// U+0100 onwards in byte order (so the space, byte 32, is U+0120 'Ġ').
std::string ByteCharacter(int byte) {
  int code_point = byte;
  if (!((byte >= 33 && byte <= 126) || (byte >= 161 && byte <= 172) || byte >= 174)) {
    int next = 256;
    for (int b = 0; b < byte; ++b) {
      if (!((b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174)) ++next;
    }
    code_point = next;
  }
  std::string out;
  if (code_point < 0x80) {
    out.push_back(static_cast<char>(code_point));
  } else {
    out.push_back(static_cast<char>(0xC0 | (code_point >> 6)));
    out.push_back(static_cast<char>(0x80 | (code_point & 0x3F)));
  }
  return out;
}

// Vocabulary: byte b has id b; then the merges' results from id 256 on, in rank order:
//   0 "l l"→ll 256, 1 "h e"→he 257, 2 "he ll"→hell 258, 3 "hell o"→hello 259,
//   4 "Ġ w"→Ġw 260, 5 "o r"→or 261, 6 "Ġw or"→Ġwor 262, 7 "l d"→ld 263,
//   8 "Ġwor ld"→Ġworld 264, 9 "3 4"→34 265.
// Added tokens: <|bos|> 270 (special), <|user|> 271 (special), [sep] 272 (not special).
nlohmann::json TokenizerJson(nlohmann::json pre_tokenizer) {
  nlohmann::json vocab = nlohmann::json::object();
  for (int byte = 0; byte < 256; ++byte) vocab[ByteCharacter(byte)] = byte;
  const std::vector<std::pair<std::string, std::string>> merges = {
      {"l", "l"}, {"h", "e"},   {"he", "ll"}, {"hell", "o"},  {"Ġ", "w"},
      {"o", "r"}, {"Ġw", "or"}, {"l", "d"},   {"Ġwor", "ld"}, {"3", "4"}};
  nlohmann::json merge_list = nlohmann::json::array();
  int id = 256;
  for (const auto& [left, right] : merges) {
    vocab[left + right] = id++;
    merge_list.push_back(left + " " + right);
  }
  return {
      {"version", "1.0"},
      {"added_tokens",
       {{{"id", 270}, {"content", "<|bos|>"}, {"special", true}},
        {{"id", 271}, {"content", "<|user|>"}, {"special", true}},
        {{"id", 272}, {"content", "[sep]"}, {"special", false}}}},
      {"normalizer", {{"type", "NFC"}}},
      {"pre_tokenizer", pre_tokenizer},
      {"post_processor", {{"type", "ByteLevel"}}},
      {"decoder", {{"type", "ByteLevel"}}},
      {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", merge_list}}},
  };
}

nlohmann::json QwenPreTokenizer() {
  return {{"type", "Sequence"},
          {"pretokenizers",
           {{{"type", "Split"}, {"pattern", {{"Regex", kQwenPattern}}}, {"behavior", "Isolated"}},
            {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}}}};
}

ModelConfig Config() {
  ModelConfig config;
  config.vocab_size = 300;
  config.bos_token_id = 270;
  return config;
}

std::unique_ptr<BpeTokenizer> Make(
    const nlohmann::json& json, const nlohmann::json& tokenizer_config = nlohmann::json::object()) {
  absl::StatusOr<std::unique_ptr<BpeTokenizer>> tokenizer =
      BpeTokenizer::Create(json, tokenizer_config, Config());
  EXPECT_TRUE(tokenizer.ok()) << tokenizer.status();
  return tokenizer.ok() ? *std::move(tokenizer) : nullptr;
}

TEST(BpeTokenizer, MergesApplyInRankOrder) {
  auto tokenizer = Make(TokenizerJson(QwenPreTokenizer()));
  ASSERT_NE(tokenizer, nullptr);
  // "hello" | " world": h e l l o → h e ll o (rank 0) → he ll o (1) → hell o (2) → hello (3);
  // Ġ w o r l d → Ġw (4) → or (5) → Ġwor (6) → ld (7) → Ġworld (8).
  EXPECT_THAT(*tokenizer->EncodeWithoutBos("hello world"), ElementsAre(259, 264));
  // Equal ranks merge leftmost first: l l l → ll l.
  EXPECT_THAT(*tokenizer->EncodeWithoutBos("lll"), ElementsAre(256, 'l'));
  // No merges apply across pre-tokenizer pieces: Qwen's pattern isolates every digit, so "34"
  // stays two tokens, while inside one piece the merge "3 4" would apply.
  EXPECT_THAT(*tokenizer->EncodeWithoutBos("1345"), ElementsAre('1', '3', '4', '5'));
  // No bos unless asked for: Qwen's tokenizer_config has none.
  EXPECT_EQ(tokenizer->bos_token_id(), std::nullopt);
  EXPECT_THAT(*tokenizer->Encode("hello"), ElementsAre(259));
}

TEST(BpeTokenizer, ByteLevelRegexAndPrefixSpace) {
  // ByteLevel with its own GPT-2 pattern: " ?\p{N}+" keeps " 1345" (after the prefix space)
  // together, so "3 4" merges; the space is byte 32.
  auto tokenizer =
      Make(TokenizerJson({{"type", "ByteLevel"}, {"add_prefix_space", true}, {"use_regex", true}}));
  ASSERT_NE(tokenizer, nullptr);
  EXPECT_THAT(*tokenizer->EncodeWithoutBos("1345"), ElementsAre(' ', '1', 265, '5'));
  // The prefix space makes "world" at the start encode like " world".
  EXPECT_THAT(*tokenizer->EncodeWithoutBos("world"), ElementsAre(264));
}

TEST(BpeTokenizer, DeepSeekV3StylePreTokenizer) {
  // DeepSeek-V3 splits digits in runs of up to three, CJK runs, then words and punctuation.
  nlohmann::json pre = {
      {"type", "Sequence"},
      {"pretokenizers",
       {{{"type", "Split"}, {"pattern", {{"Regex", R"(\p{N}{1,3})"}}}, {"behavior", "Isolated"}},
        {{"type", "Split"},
         {"pattern", {{"Regex", "[一-龥぀-ゟ゠-ヿ]+"}}},
         {"behavior", "Isolated"}},
        {{"type", "Split"},
         {"pattern",
          {{"Regex",
            R"([!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)"}}},
         {"behavior", "Isolated"}},
        {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}}}};
  auto tokenizer = Make(TokenizerJson(pre));
  ASSERT_NE(tokenizer, nullptr);
  // "12345" → "123" | "45": the 3 and the 4 are in different pieces, so "3 4" does not merge.
  EXPECT_THAT(*tokenizer->EncodeWithoutBos("12345"), ElementsAre('1', '2', '3', '4', '5'));
  // "234": one piece, "3 4" merges.
  EXPECT_THAT(*tokenizer->EncodeWithoutBos("234"), ElementsAre('2', 265));
  EXPECT_THAT(*tokenizer->EncodeWithoutBos("hello world"), ElementsAre(259, 264));
}

TEST(BpeTokenizer, AddedTokensAreCutOutFirstAndSpecialOnesDecodeToNothing) {
  auto tokenizer = Make(TokenizerJson(QwenPreTokenizer()));
  ASSERT_NE(tokenizer, nullptr);
  EXPECT_THAT(*tokenizer->EncodeWithoutBos("<|user|>hello[sep] world"),
              ElementsAre(271, 259, 272, 264));
  EXPECT_EQ(tokenizer->TokenBytes(271), "");
  EXPECT_EQ(tokenizer->TokenBytes(272), "[sep]");
  EXPECT_EQ(tokenizer->TokenBytes(264), " world");
  EXPECT_EQ(tokenizer->TokenBytes(299), "");  // no such token
}

TEST(BpeTokenizer, NfcNormalizationAndByteRoundTrip) {
  auto tokenizer = Make(TokenizerJson(QwenPreTokenizer()));
  ASSERT_NE(tokenizer, nullptr);
  // "e" + U+0301 (combining acute) is "é" (U+00E9, bytes C3 A9) after NFC.
  EXPECT_THAT(*tokenizer->EncodeWithoutBos("e\xCC\x81"), ElementsAre(0xC3, 0xA9));
  // Decoding gives back the bytes of (already normalized) text, whatever its script.
  const std::string text = "héllo wörld\n\t  日本語 🙂 it's 2024!! ";
  std::string decoded;
  const absl::StatusOr<std::vector<int32_t>> ids = tokenizer->EncodeWithoutBos(text);
  ASSERT_TRUE(ids.ok()) << ids.status();
  for (int32_t id : *ids) decoded += tokenizer->TokenBytes(id);
  EXPECT_EQ(decoded, text);
}

TEST(BpeTokenizer, BeginningOfSequenceFromTokenizerConfigOrTemplate) {
  const nlohmann::json json = TokenizerJson(QwenPreTokenizer());
  auto from_config = Make(json, {{"add_bos_token", true}, {"bos_token", {{"content", "<|bos|>"}}}});
  ASSERT_NE(from_config, nullptr);
  EXPECT_THAT(*from_config->Encode("hello"), ElementsAre(270, 259));
  auto disabled = Make(json, {{"add_bos_token", false}, {"bos_token", "<|bos|>"}});
  EXPECT_THAT(*disabled->Encode("hello"), ElementsAre(259));

  nlohmann::json templated = json;
  templated["post_processor"] = {
      {"type", "TemplateProcessing"},
      {"single",
       {{{"SpecialToken", {{"id", "<|bos|>"}, {"type_id", 0}}}},
        {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
      {"special_tokens",
       {{"<|bos|>", {{"id", "<|bos|>"}, {"ids", {270}}, {"tokens", {"<|bos|>"}}}}}}};
  auto from_template = Make(templated);
  ASSERT_NE(from_template, nullptr);
  EXPECT_THAT(*from_template->Encode("hello"), ElementsAre(270, 259));
}

TEST(BpeTokenizer, MergesAsPairs) {
  nlohmann::json json = TokenizerJson(QwenPreTokenizer());
  nlohmann::json pairs = nlohmann::json::array();
  for (const auto& merge : json["model"]["merges"]) {
    const std::string text = merge.get<std::string>();
    pairs.push_back({text.substr(0, text.find(' ')), text.substr(text.find(' ') + 1)});
  }
  json["model"]["merges"] = pairs;  // the newer [["a", "b"], ...] spelling
  auto tokenizer = Make(json);
  ASSERT_NE(tokenizer, nullptr);
  EXPECT_THAT(*tokenizer->EncodeWithoutBos("hello world"), ElementsAre(259, 264));
}

absl::Status CreateError(const nlohmann::json& json) {
  absl::StatusOr<std::unique_ptr<BpeTokenizer>> tokenizer =
      BpeTokenizer::Create(json, nlohmann::json::object(), Config());
  EXPECT_FALSE(tokenizer.ok());
  return tokenizer.ok() ? absl::OkStatus() : tokenizer.status();
}

TEST(BpeTokenizer, RefusesWhatItCannotEncodeFaithfully) {
  const nlohmann::json good = TokenizerJson(QwenPreTokenizer());
  nlohmann::json json = good;
  json["model"]["type"] = "WordPiece";
  EXPECT_THAT(CreateError(json).message(), HasSubstr("unsupported model `WordPiece`"));
  json = good;
  json["pre_tokenizer"] = {{"type", "Whitespace"}};
  EXPECT_THAT(CreateError(json).message(), HasSubstr("pre_tokenizer `Whitespace`"));
  json = good;
  json["decoder"] = {{"type", "WordPiece"}};
  EXPECT_THAT(CreateError(json).message(), HasSubstr("decoder `WordPiece`"));
  json = good;
  json["pre_tokenizer"] = {{"type", "Metaspace"}, {"replacement", "_"}, {"prepend_scheme", "x"}};
  EXPECT_THAT(CreateError(json).message(), HasSubstr("prepend_scheme `x`"));
  json = good;
  json["model"]["merges"].push_back("he xyz");  // the library refuses such a file too
  EXPECT_THAT(CreateError(json).message(),
              HasSubstr("needs `xyz`, which is not in the vocabulary"));
  json = good;
  json["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "(unclosed";
  EXPECT_THAT(CreateError(json).message(), HasSubstr("cannot compile the regex"));
  json = good;
  json["normalizer"] = {{"type", "Lowercase"}};
  EXPECT_THAT(CreateError(json).message(), HasSubstr("normalizer `Lowercase`"));
  json = good;
  json["model"]["vocab"]["huge"] = 5000;  // the model's vocabulary has 300 entries
  EXPECT_THAT(CreateError(json).message(), HasSubstr("outside the model's vocabulary"));
  json = good;
  json["model"]["merges"].push_back("nospace");
  EXPECT_THAT(CreateError(json).message(), HasSubstr("malformed merge"));
  EXPECT_THAT(CreateError(nlohmann::json::array()).message(), HasSubstr("JSON object"));
}

TEST(BpeTokenizer, WronglyTypedOptionalFieldsAreRefusedNamingTheField) {
  // Each of these used to end the process with an uncaught exception.
  const nlohmann::json good = TokenizerJson(QwenPreTokenizer());
  const struct {
    const char* what;
    std::function<void(nlohmann::json&)> change;
    const char* message;
  } cases[] = {
      {"byte_fallback", [](nlohmann::json& j) { j["model"]["byte_fallback"] = "no"; },
       "model `byte_fallback` must be true or false, got \"no\""},
      {"ignore_merges", [](nlohmann::json& j) { j["model"]["ignore_merges"] = 1; },
       "`ignore_merges` must be true or false"},
      {"special", [](nlohmann::json& j) { j["added_tokens"][0]["special"] = "yes"; },
       "added token `special`"},
      {"add_prefix_space",
       [](nlohmann::json& j) { j["pre_tokenizer"]["pretokenizers"][1]["add_prefix_space"] = 0; },
       "ByteLevel `add_prefix_space`"},
      {"use_regex",
       [](nlohmann::json& j) { j["pre_tokenizer"]["pretokenizers"][1]["use_regex"] = "false"; },
       "ByteLevel `use_regex`"},
      {"behavior",
       [](nlohmann::json& j) { j["pre_tokenizer"]["pretokenizers"][0]["behavior"] = 3; },
       "Split `behavior` must be a string"},
      {"invert",
       [](nlohmann::json& j) { j["pre_tokenizer"]["pretokenizers"][0]["invert"] = nullptr; },
       ""},  // null is the same as absent
      {"individual_digits",
       [](nlohmann::json& j) {
         j["pre_tokenizer"]["pretokenizers"][0] = {{"type", "Digits"}, {"individual_digits", "1"}};
       },
       "Digits `individual_digits`"},
      {"post_processor",
       [](nlohmann::json& j) {
         j["post_processor"] = {{"type", "TemplateProcessing"},
                                {"single", {{{"SpecialToken", {{"id", 7}}}}}},
                                {"special_tokens", "none"}};
       },
       "SpecialToken `id` must be a string"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.what);
    nlohmann::json json = good;
    c.change(json);
    absl::StatusOr<std::unique_ptr<BpeTokenizer>> tokenizer =
        BpeTokenizer::Create(json, nlohmann::json::object(), Config());
    if (std::string(c.message).empty()) {
      EXPECT_TRUE(tokenizer.ok()) << tokenizer.status();
      continue;
    }
    ASSERT_FALSE(tokenizer.ok());
    EXPECT_EQ(tokenizer.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(tokenizer.status().message(), HasSubstr(c.message));
  }
}

TEST(BpeTokenizer, ABacktrackingPreTokenizerRegexIsBoundedPerText) {
  // `(a+)+$` backtracks exponentially on "aaa…ab": unbounded, one request of 40 bytes would
  // take longer than the universe has existed.
  nlohmann::json json = TokenizerJson(QwenPreTokenizer());
  json["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "(a+)+$";
  auto tokenizer = Make(json);
  ASSERT_NE(tokenizer, nullptr);
  const absl::StatusOr<std::vector<int32_t>> ids = tokenizer->Encode(std::string(40, 'a') + "b");
  ASSERT_FALSE(ids.ok());
  EXPECT_EQ(ids.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(ids.status().message(), HasSubstr("more work to tokenize than the server allows"));
  // The same tokenizer still encodes texts its regex handles without backtracking.
  EXPECT_TRUE(tokenizer->Encode("hello world").ok());
}

TEST(BpeTokenizer, LongOrdinaryTextsStayWithinTheRegexBound) {
  // Qwen's and GPT-2's patterns on a megabyte of mixed text: the bound is far above what they
  // need, so no ordinary request is refused.
  std::string text;
  for (int i = 0; text.size() < (1 << 20); ++i) {
    text += absl::StrCat("Hello, world! It's 2024-05-", i % 31, "; naïve café \t\n  ", i, " ");
  }
  auto qwen = Make(TokenizerJson(QwenPreTokenizer()));
  ASSERT_NE(qwen, nullptr);
  const absl::StatusOr<std::vector<int32_t>> qwen_ids = qwen->Encode(text);
  EXPECT_TRUE(qwen_ids.ok()) << qwen_ids.status();
  auto gpt2 = Make(TokenizerJson({{"type", "ByteLevel"}, {"use_regex", true}}));
  ASSERT_NE(gpt2, nullptr);
  const absl::StatusOr<std::vector<int32_t>> gpt2_ids = gpt2->Encode(text);
  EXPECT_TRUE(gpt2_ids.ok()) << gpt2_ids.status();
}

TEST(BpeTokenizer, LoadModelReadsTokenizerJsonBesideTheWeights) {
  nlohmann::json config = testing::SmallQwen3MoeJson();
  config["vocab_size"] = 300;
  config["bos_token_id"] = 270;
  const std::filesystem::path folder = testing::MakeTempFolder("with_tokenizer");
  testing::WriteCheckpoint(folder, config,
                           testing::Encode(testing::RandomWeights(config), DType::kF32));
  testing::WriteText(folder / "tokenizer.json", TokenizerJson(QwenPreTokenizer()).dump());
  absl::StatusOr<LoadedModel> loaded = LoadModel(folder.string());
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  ASSERT_NE(loaded->tokenizer, nullptr);
  EXPECT_THAT(*loaded->tokenizer->Encode("hello world"), ElementsAre(259, 264));

  testing::WriteText(folder / "tokenizer.json", "{broken");
  absl::StatusOr<LoadedModel> broken = LoadModel(folder.string());
  ASSERT_FALSE(broken.ok());
  EXPECT_THAT(broken.status().message(), HasSubstr("tokenizer.json"));
}

}  // namespace
}  // namespace moeserve::engine
