#include "engine/model/bpe_tokenizer.h"

#include <unicode/normalizer2.h>
#include <unicode/regex.h>
#include <unicode/unistr.h>

#include <algorithm>
#include <limits>
#include <map>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "engine/base/status_macros.h"
#include "nlohmann/json.hpp"

namespace moeserve::engine {
namespace {

// GPT-2's pre-tokenizer regex, which ByteLevel applies when `use_regex` is true.
constexpr char kGpt2Pattern[] =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

absl::Status Unsupported(absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("tokenizer: unsupported ", what));
}

std::string TypeOf(const nlohmann::json& component) {
  if (!component.is_object()) return "";
  auto it = component.find("type");
  return it != component.end() && it->is_string() ? it->get<std::string>() : "";
}

// Byte-level BPE spells every byte as a printable character: bytes that are printable Latin-1
// keep their code point, the others (controls, space, a few more) take 256, 257, … in order.
std::vector<std::string> ByteAlphabet() {
  std::vector<std::string> alphabet(256);
  int next = 256;
  for (int byte = 0; byte < 256; ++byte) {
    const bool printable =
        (byte >= 33 && byte <= 126) || (byte >= 161 && byte <= 172) || byte >= 174;
    const UChar32 code_point = printable ? byte : next++;
    icu::UnicodeString(code_point).toUTF8String(alphabet[byte]);
  }
  return alphabet;
}

// Splits UTF-8 text into its characters (each as UTF-8 bytes).
std::vector<std::string> Utf8Characters(const std::string& text) {
  std::vector<std::string> characters;
  for (size_t i = 0; i < text.size();) {
    const auto lead = static_cast<unsigned char>(text[i]);
    size_t length = lead < 0x80 ? 1 : lead < 0xE0 ? 2 : lead < 0xF0 ? 3 : 4;
    length = std::min(length, text.size() - i);
    characters.push_back(text.substr(i, length));
    i += length;
  }
  return characters;
}

enum class SplitBehavior { kIsolated, kRemoved, kMergedWithPrevious, kMergedWithNext };

struct SplitStep {
  std::unique_ptr<icu::RegexPattern> pattern;  // null: only the prefix space below
  SplitBehavior behavior = SplitBehavior::kIsolated;
  bool add_prefix_space = false;  // ByteLevel's: each piece starts with a space before splitting
};

absl::StatusOr<std::unique_ptr<icu::RegexPattern>> CompileRegex(const std::string& regex,
                                                                bool literal) {
  UErrorCode status = U_ZERO_ERROR;
  UParseError parse_error;
  std::unique_ptr<icu::RegexPattern> pattern(icu::RegexPattern::compile(
      icu::UnicodeString::fromUTF8(regex), literal ? UREGEX_LITERAL : 0, parse_error, status));
  if (U_FAILURE(status)) {
    return absl::InvalidArgumentError(absl::StrCat("tokenizer: cannot compile the regex `", regex,
                                                   "`: ", u_errorName(status), " at offset ",
                                                   parse_error.offset));
  }
  return pattern;
}

struct AddedToken {
  std::string content;
  int32_t id = 0;
  bool special = false;
};

// The regex work one Encode may still do, in ICU time units (10,000 backtracking steps each).
// ICU calls RegexWorkCallback once per unit of every match; it stops the match once the text's
// budget is spent.
struct RegexBudget {
  int64_t units_left = 0;
  bool exhausted = false;
};

UBool U_CALLCONV RegexWorkCallback(const void* context, int32_t /*units_of_this_match*/) {
  // ICU passes back the pointer it was given; the budget belongs to the running Encode call.
  auto* budget = static_cast<RegexBudget*>(const_cast<void*>(context));
  if (--budget->units_left >= 0) return true;
  budget->exhausted = true;
  return false;
}

}  // namespace

struct BpeTokenizer::Impl {
  std::vector<std::string> byte_alphabet = ByteAlphabet();
  std::unordered_map<std::string, uint8_t> byte_of_character;
  std::unordered_map<std::string, int32_t> vocab;
  std::unordered_map<int32_t, std::string> token_of_id;
  std::unordered_map<std::string, int> merge_rank;  // "left\0right" -> rank
  std::vector<AddedToken> added_tokens;             // longest first
  std::unordered_map<int32_t, const AddedToken*> added_by_id;
  const icu::Normalizer2* normalizer = nullptr;  // null: none
  std::vector<SplitStep> splits;                 // applied in order
  std::optional<int32_t> unknown_id;
  bool ignore_merges = false;

  absl::StatusOr<std::vector<std::string>> PreTokenize(const std::string& text,
                                                       RegexBudget& budget) const;
  void EncodeWord(const std::string& word, std::vector<int32_t>& ids) const;
  absl::Status EncodePlain(const std::string& text, std::vector<int32_t>& ids,
                           RegexBudget& budget) const;
};

absl::StatusOr<std::vector<std::string>> BpeTokenizer::Impl::PreTokenize(
    const std::string& text, RegexBudget& budget) const {
  std::vector<std::string> pieces = {text};
  // Const method, local copies: each step rewrites `pieces`.
  for (const SplitStep& step : splits) {
    std::vector<std::string> next;
    for (std::string& piece : pieces) {
      if (step.add_prefix_space && (piece.empty() || piece[0] != ' '))
        piece.insert(piece.begin(), ' ');
      if (step.pattern == nullptr) {
        next.push_back(piece);
        continue;
      }
      const icu::UnicodeString unicode = icu::UnicodeString::fromUTF8(piece);
      UErrorCode status = U_ZERO_ERROR;
      std::unique_ptr<icu::RegexMatcher> matcher(step.pattern->matcher(unicode, status));
      // ICU counts work units only while a time limit is set; the callback does the bounding,
      // across every match of this Encode call.
      if (U_SUCCESS(status)) matcher->setTimeLimit(std::numeric_limits<int32_t>::max(), status);
      if (U_SUCCESS(status)) matcher->setMatchCallback(&RegexWorkCallback, &budget, status);
      if (U_FAILURE(status)) {
        return absl::InternalError(
            absl::StrCat("tokenizer: cannot run the pre-tokenizer regex: ", u_errorName(status)));
      }
      auto substring = [&](int32_t begin, int32_t end) {
        std::string out;
        unicode.tempSubStringBetween(begin, end).toUTF8String(out);
        return out;
      };
      std::vector<std::string> parts;  // alternating: gap, match, gap, match, ..., gap
      std::vector<bool> is_match;
      int32_t position = 0;
      while (matcher->find(status) && U_SUCCESS(status)) {
        const int32_t begin = matcher->start(status);
        const int32_t end = matcher->end(status);
        if (end == begin) continue;  // empty matches split nothing
        if (begin > position) {
          parts.push_back(substring(position, begin));
          is_match.push_back(false);
        }
        parts.push_back(substring(begin, end));
        is_match.push_back(true);
        position = end;
      }
      if (budget.exhausted) {
        return absl::InvalidArgumentError(
            "the text needs more work to tokenize than the server allows one request (the "
            "tokenizer's pre-tokenizer regex backtracks heavily on it); shorten or change it");
      }
      if (U_FAILURE(status)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "the tokenizer's pre-tokenizer regex failed on the text: ", u_errorName(status)));
      }
      if (position < unicode.length()) {
        parts.push_back(substring(position, unicode.length()));
        is_match.push_back(false);
      }
      std::vector<std::string> merged;
      for (size_t i = 0; i < parts.size(); ++i) {
        switch (step.behavior) {
          case SplitBehavior::kIsolated:
            merged.push_back(parts[i]);
            break;
          case SplitBehavior::kRemoved:
            if (!is_match[i]) merged.push_back(parts[i]);
            break;
          case SplitBehavior::kMergedWithPrevious:
            if (is_match[i] && !merged.empty() && !is_match[i - 1])
              merged.back() += parts[i];
            else
              merged.push_back(parts[i]);
            break;
          case SplitBehavior::kMergedWithNext:
            if (i > 0 && is_match[i - 1] && !is_match[i])
              merged.back() += parts[i];
            else
              merged.push_back(parts[i]);
            break;
        }
      }
      for (std::string& part : merged) next.push_back(std::move(part));
    }
    pieces = std::move(next);
  }
  return pieces;
}

void BpeTokenizer::Impl::EncodeWord(const std::string& word, std::vector<int32_t>& ids) const {
  if (ignore_merges) {
    if (auto it = vocab.find(word); it != vocab.end()) {
      ids.push_back(it->second);
      return;
    }
  }
  std::vector<std::string> symbols = Utf8Characters(word);
  // Repeatedly merge the adjacent pair with the best (lowest) rank, leftmost first.
  std::string key;
  while (symbols.size() > 1) {
    int best_rank = std::numeric_limits<int>::max();
    size_t best = 0;
    for (size_t i = 0; i + 1 < symbols.size(); ++i) {
      key.assign(symbols[i]).push_back('\0');
      key += symbols[i + 1];
      auto it = merge_rank.find(key);
      if (it != merge_rank.end() && it->second < best_rank) {
        best_rank = it->second;
        best = i;
      }
    }
    if (best_rank == std::numeric_limits<int>::max()) break;
    symbols[best] += symbols[best + 1];
    symbols.erase(symbols.begin() + static_cast<std::ptrdiff_t>(best) + 1);
  }
  for (const std::string& symbol : symbols) {
    if (auto it = vocab.find(symbol); it != vocab.end()) {
      ids.push_back(it->second);
    } else if (unknown_id) {
      ids.push_back(*unknown_id);
    }
  }
}

absl::Status BpeTokenizer::Impl::EncodePlain(const std::string& raw, std::vector<int32_t>& ids,
                                             RegexBudget& budget) const {
  std::string text = raw;
  if (normalizer != nullptr) {
    UErrorCode status = U_ZERO_ERROR;
    const icu::UnicodeString normalized =
        normalizer->normalize(icu::UnicodeString::fromUTF8(raw), status);
    if (U_SUCCESS(status)) {
      text.clear();
      normalized.toUTF8String(text);
    }
  }
  absl::StatusOr<std::vector<std::string>> pieces = PreTokenize(text, budget);
  if (!pieces.ok()) return pieces.status();
  for (std::string& piece : *pieces) {
    if (piece.empty()) continue;
    std::string word;
    for (unsigned char byte : piece) word += byte_alphabet[byte];
    EncodeWord(word, ids);
  }
  return absl::OkStatus();
}

BpeTokenizer::BpeTokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
BpeTokenizer::~BpeTokenizer() = default;

absl::StatusOr<std::vector<int32_t>> BpeTokenizer::EncodeWithoutBos(std::string_view text) const {
  RegexBudget budget{kRegexWorkUnitsBase +
                     static_cast<int64_t>(text.size()) / kRegexBytesPerWorkUnit};
  std::vector<int32_t> ids;
  std::string plain;
  size_t i = 0;
  while (i < text.size()) {
    const AddedToken* match = nullptr;
    for (const AddedToken& token : impl_->added_tokens) {  // longest first
      if (text.substr(i).starts_with(token.content)) {
        match = &token;
        break;
      }
    }
    if (match == nullptr) {
      plain.push_back(text[i++]);
      continue;
    }
    if (!plain.empty()) {
      if (absl::Status s = impl_->EncodePlain(plain, ids, budget); !s.ok()) return s;
    }
    plain.clear();
    ids.push_back(match->id);
    i += match->content.size();
  }
  if (!plain.empty()) {
    if (absl::Status s = impl_->EncodePlain(plain, ids, budget); !s.ok()) return s;
  }
  return ids;
}

absl::StatusOr<std::vector<int32_t>> BpeTokenizer::Encode(std::string_view text) const {
  absl::StatusOr<std::vector<int32_t>> rest = EncodeWithoutBos(text);
  if (!rest.ok() || !bos_token_id_) return rest;
  rest->insert(rest->begin(), *bos_token_id_);
  return rest;
}

std::string BpeTokenizer::TokenBytes(int32_t token) const {
  if (auto it = impl_->added_by_id.find(token); it != impl_->added_by_id.end()) {
    return it->second->special ? "" : it->second->content;
  }
  auto it = impl_->token_of_id.find(token);
  if (it == impl_->token_of_id.end()) return "";
  std::string bytes;
  for (const std::string& character : Utf8Characters(it->second)) {
    auto byte = impl_->byte_of_character.find(character);
    if (byte != impl_->byte_of_character.end()) {
      bytes.push_back(static_cast<char>(byte->second));
    } else {
      bytes += character;  // not part of the byte alphabet: keep its UTF-8 spelling
    }
  }
  return bytes;
}

namespace {

// Optional fields of tokenizer.json's components: absent or null leaves `out` at its default; a
// value of another type is refused naming the field (json::value() would throw instead).
absl::Status ReadOptional(const nlohmann::json& object, const char* key, bool* out,
                          absl::string_view component) {
  auto it = object.find(key);
  if (it == object.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_boolean()) {
    return absl::InvalidArgumentError(absl::StrCat("tokenizer: ", component, " `", key,
                                                   "` must be true or false, got ",
                                                   it->dump().substr(0, 64)));
  }
  *out = it->get<bool>();
  return absl::OkStatus();
}

absl::Status ReadOptional(const nlohmann::json& object, const char* key, std::string* out,
                          absl::string_view component) {
  auto it = object.find(key);
  if (it == object.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_string()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tokenizer: ", component, " `", key, "` must be a string, got ", it->dump().substr(0, 64)));
  }
  *out = it->get<std::string>();
  return absl::OkStatus();
}

absl::Status AddNormalizer(const nlohmann::json& normalizer, const icu::Normalizer2** out) {
  if (normalizer.is_null()) return absl::OkStatus();
  const std::string type = TypeOf(normalizer);
  if (type == "Sequence") {
    auto list = normalizer.find("normalizers");
    if (list == normalizer.end() || !list->is_array())
      return Unsupported("normalizer Sequence without a list");
    for (const nlohmann::json& item : *list) {
      RETURN_IF_ERROR(AddNormalizer(item, out));
    }
    return absl::OkStatus();
  }
  if (*out != nullptr) return Unsupported("normalizer: more than one Unicode normalization");
  UErrorCode status = U_ZERO_ERROR;
  if (type == "NFC")
    *out = icu::Normalizer2::getNFCInstance(status);
  else if (type == "NFD")
    *out = icu::Normalizer2::getNFDInstance(status);
  else if (type == "NFKC")
    *out = icu::Normalizer2::getNFKCInstance(status);
  else if (type == "NFKD")
    *out = icu::Normalizer2::getNFKDInstance(status);
  else
    return Unsupported(
        absl::StrCat("normalizer `", type, "` (supported: NFC, NFD, NFKC, NFKD, Sequence)"));
  if (U_FAILURE(status)) return absl::InternalError("tokenizer: ICU normalizer unavailable");
  return absl::OkStatus();
}

// Flattens the pre-tokenizer into split steps. Byte-level BPE needs a ByteLevel step, last.
absl::Status AddPreTokenizer(const nlohmann::json& step, std::vector<SplitStep>& splits,
                             bool* byte_level) {
  const std::string type = TypeOf(step);
  if (*byte_level) return Unsupported(absl::StrCat("pre_tokenizer: `", type, "` after ByteLevel"));
  if (type == "Sequence") {
    auto list = step.find("pretokenizers");
    if (list == step.end() || !list->is_array())
      return Unsupported("pre_tokenizer Sequence without a list");
    for (const nlohmann::json& item : *list) {
      RETURN_IF_ERROR(AddPreTokenizer(item, splits, byte_level));
    }
    return absl::OkStatus();
  }
  if (type == "ByteLevel") {
    *byte_level = true;
    SplitStep byte_level_step;
    bool use_regex = true;
    if (auto s = ReadOptional(step, "add_prefix_space", &byte_level_step.add_prefix_space,
                              "pre_tokenizer ByteLevel");
        !s.ok())
      return s;
    if (auto s = ReadOptional(step, "use_regex", &use_regex, "pre_tokenizer ByteLevel"); !s.ok())
      return s;
    if (use_regex) {
      absl::StatusOr<std::unique_ptr<icu::RegexPattern>> pattern =
          CompileRegex(kGpt2Pattern, false);
      if (!pattern.ok()) return pattern.status();
      byte_level_step.pattern = *std::move(pattern);
    }
    splits.push_back(std::move(byte_level_step));
    return absl::OkStatus();
  }
  if (type == "Digits") {
    bool individual = false;
    if (auto s = ReadOptional(step, "individual_digits", &individual, "pre_tokenizer Digits");
        !s.ok())
      return s;
    absl::StatusOr<std::unique_ptr<icu::RegexPattern>> pattern =
        CompileRegex(individual ? R"(\p{N})" : R"(\p{N}+)", false);
    if (!pattern.ok()) return pattern.status();
    splits.push_back({*std::move(pattern), SplitBehavior::kIsolated, false});
    return absl::OkStatus();
  }
  if (type == "Split") {
    bool invert = false;
    std::string behavior = "Isolated";
    if (auto s = ReadOptional(step, "invert", &invert, "pre_tokenizer Split"); !s.ok()) return s;
    if (invert) return Unsupported("pre_tokenizer Split with `invert`");
    if (auto s = ReadOptional(step, "behavior", &behavior, "pre_tokenizer Split"); !s.ok())
      return s;
    SplitBehavior split_behavior;
    if (behavior == "Isolated")
      split_behavior = SplitBehavior::kIsolated;
    else if (behavior == "Removed")
      split_behavior = SplitBehavior::kRemoved;
    else if (behavior == "MergedWithPrevious")
      split_behavior = SplitBehavior::kMergedWithPrevious;
    else if (behavior == "MergedWithNext")
      split_behavior = SplitBehavior::kMergedWithNext;
    else
      return Unsupported(absl::StrCat("pre_tokenizer Split behavior `", behavior, "`"));
    auto pattern_json = step.find("pattern");
    if (pattern_json == step.end() || !pattern_json->is_object()) {
      return Unsupported("pre_tokenizer Split without a pattern");
    }
    const bool literal = pattern_json->contains("String");
    const nlohmann::json& text =
        literal ? (*pattern_json)["String"] : pattern_json->value("Regex", nlohmann::json());
    if (!text.is_string())
      return Unsupported("pre_tokenizer Split pattern (needs Regex or String)");
    absl::StatusOr<std::unique_ptr<icu::RegexPattern>> pattern =
        CompileRegex(text.get<std::string>(), literal);
    if (!pattern.ok()) return pattern.status();
    splits.push_back({*std::move(pattern), split_behavior, false});
    return absl::OkStatus();
  }
  return Unsupported(
      absl::StrCat("pre_tokenizer `", type, "` (supported: ByteLevel, Split, Digits, Sequence)"));
}

// The content of a token given as a string or as {"content": ...}.
std::optional<std::string> TokenContent(const nlohmann::json& token) {
  if (token.is_string()) return token.get<std::string>();
  if (token.is_object() && token.contains("content") && token["content"].is_string()) {
    return token["content"].get<std::string>();
  }
  return std::nullopt;
}

}  // namespace

absl::StatusOr<std::unique_ptr<BpeTokenizer>> BpeTokenizer::Create(
    const nlohmann::json& json, const nlohmann::json& tokenizer_config, const ModelConfig& config) {
  // Fields are read with their types checked; this catches what a check missed, so a malformed
  // file is refused rather than ending the process.
  try {
    return CreateChecked(json, tokenizer_config, config);
  } catch (const nlohmann::json::exception& error) {
    return absl::InvalidArgumentError(
        absl::StrCat("tokenizer: malformed tokenizer.json: ", error.what()));
  }
}

absl::StatusOr<std::unique_ptr<BpeTokenizer>> BpeTokenizer::CreateChecked(
    const nlohmann::json& json, const nlohmann::json& tokenizer_config, const ModelConfig& config) {
  if (!json.is_object()) return absl::InvalidArgumentError("tokenizer: expected a JSON object");
  auto impl = std::make_unique<Impl>();
  for (int byte = 0; byte < 256; ++byte) impl->byte_of_character[impl->byte_alphabet[byte]] = byte;

  const nlohmann::json model = json.value("model", nlohmann::json());
  if (TypeOf(model) != "BPE")
    return Unsupported(absl::StrCat("model `", TypeOf(model), "` (only BPE)"));
  bool byte_fallback = false;
  if (auto s = ReadOptional(model, "byte_fallback", &byte_fallback, "model"); !s.ok()) return s;
  if (byte_fallback) {
    return Unsupported(
        "BPE with byte_fallback (SentencePiece-style); only byte-level BPE is supported");
  }
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    auto it = model.find(key);
    if (it != model.end() && it->is_string() && !it->get<std::string>().empty()) {
      return Unsupported(absl::StrCat("BPE `", key, "`"));
    }
  }
  if (auto s = ReadOptional(model, "ignore_merges", &impl->ignore_merges, "model"); !s.ok())
    return s;
  auto vocab = model.find("vocab");
  if (vocab == model.end() || !vocab->is_object()) {
    return absl::InvalidArgumentError("tokenizer: `model.vocab` must be an object");
  }
  auto check_id = [&](const std::string& token, const nlohmann::json& id) -> absl::Status {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 ||
        id.get<int64_t>() >= config.vocab_size) {
      return absl::InvalidArgumentError(
          absl::StrCat("tokenizer: token `", token, "` has id ", id.dump(),
                       ", outside the model's vocabulary of ", config.vocab_size));
    }
    return absl::OkStatus();
  };
  for (const auto& [token, id] : vocab->items()) {
    RETURN_IF_ERROR(check_id(token, id));
    impl->vocab[token] = id.get<int32_t>();
    impl->token_of_id[id.get<int32_t>()] = token;
  }
  auto merges = model.find("merges");
  if (merges == model.end() || !merges->is_array()) {
    return absl::InvalidArgumentError("tokenizer: `model.merges` must be an array");
  }
  int rank = 0;
  for (const nlohmann::json& merge : *merges) {
    std::string left, right;
    if (merge.is_string()) {  // "left right"
      const std::string text = merge.get<std::string>();
      const size_t space = text.find(' ', 1);
      if (space == std::string::npos) {
        return absl::InvalidArgumentError(absl::StrCat("tokenizer: malformed merge `", text, "`"));
      }
      left = text.substr(0, space);
      right = text.substr(space + 1);
    } else if (merge.is_array() && merge.size() == 2 && merge[0].is_string() &&
               merge[1].is_string()) {
      left = merge[0].get<std::string>();
      right = merge[1].get<std::string>();
    } else {
      return absl::InvalidArgumentError(absl::StrCat("tokenizer: malformed merge ", merge.dump()));
    }
    impl->merge_rank.emplace(left + '\0' + right, rank++);
  }
  if (auto unknown = model.find("unk_token"); unknown != model.end() && unknown->is_string()) {
    if (auto it = impl->vocab.find(unknown->get<std::string>()); it != impl->vocab.end()) {
      impl->unknown_id = it->second;
    }
  }

  if (auto added = json.find("added_tokens"); added != json.end() && added->is_array()) {
    for (const nlohmann::json& token : *added) {
      std::optional<std::string> content = TokenContent(token);
      if (!content || content->empty() || !token.contains("id")) {
        return absl::InvalidArgumentError(
            absl::StrCat("tokenizer: malformed added token ", token.dump()));
      }
      RETURN_IF_ERROR(check_id(*content, token["id"]));
      bool special = false;
      RETURN_IF_ERROR(ReadOptional(token, "special", &special, "added token"));
      impl->added_tokens.push_back({*content, token["id"].get<int32_t>(), special});
    }
    std::stable_sort(impl->added_tokens.begin(), impl->added_tokens.end(),
                     [](const AddedToken& a, const AddedToken& b) {
                       return a.content.size() > b.content.size();
                     });
    for (const AddedToken& token : impl->added_tokens) impl->added_by_id[token.id] = &token;
  }

  RETURN_IF_ERROR(AddNormalizer(json.value("normalizer", nlohmann::json()), &impl->normalizer));
  bool byte_level = false;
  const nlohmann::json pre_tokenizer = json.value("pre_tokenizer", nlohmann::json());
  if (!pre_tokenizer.is_null()) {
    RETURN_IF_ERROR(AddPreTokenizer(pre_tokenizer, impl->splits, &byte_level));
  }
  if (!byte_level) {
    return Unsupported(
        "tokenizer without a ByteLevel pre-tokenizer; only byte-level BPE (as DeepSeek "
        "and Qwen ship) is supported");
  }

  // Beginning of sequence: tokenizer_config.json's add_bos_token decides when it is given;
  // otherwise a post-processor template that starts with a special token.
  auto find_id = [&](const std::string& content) -> std::optional<int32_t> {
    for (const AddedToken& token : impl->added_tokens) {
      if (token.content == content) return token.id;
    }
    if (auto it = impl->vocab.find(content); it != impl->vocab.end()) return it->second;
    return std::nullopt;
  };
  std::optional<int32_t> bos;
  auto add_bos = tokenizer_config.is_object() ? tokenizer_config.find("add_bos_token")
                                              : nlohmann::json::const_iterator();
  if (tokenizer_config.is_object() && add_bos != tokenizer_config.end() && add_bos->is_boolean()) {
    if (add_bos->get<bool>()) {
      std::optional<std::string> content = tokenizer_config.contains("bos_token")
                                               ? TokenContent(tokenizer_config["bos_token"])
                                               : std::nullopt;
      bos = content ? find_id(*content) : std::nullopt;
      if (!bos) bos = config.bos_token_id;
    }
  } else if (const nlohmann::json post = json.value("post_processor", nlohmann::json());
             TypeOf(post) == "TemplateProcessing") {
    const nlohmann::json single = post.value("single", nlohmann::json::array());
    if (single.is_array() && !single.empty() && single[0].is_object() &&
        single[0].contains("SpecialToken")) {
      const nlohmann::json& special = single[0]["SpecialToken"];
      std::string name;
      if (special.is_object()) {
        if (auto s = ReadOptional(special, "id", &name, "post_processor SpecialToken"); !s.ok())
          return s;
      }
      // special_tokens[name].ids, where each level may be missing or of the wrong kind.
      nlohmann::json ids = nlohmann::json::array();
      if (auto tokens = post.find("special_tokens"); tokens != post.end() && tokens->is_object()) {
        if (auto entry = tokens->find(name); entry != tokens->end() && entry->is_object()) {
          if (auto list = entry->find("ids"); list != entry->end()) ids = *list;
        }
      }
      if (ids.is_array() && ids.size() == 1 && ids[0].is_number_integer()) {
        bos = ids[0].get<int32_t>();
      } else {
        bos = find_id(name);
      }
    }
  }
  if (bos && (*bos < 0 || *bos >= config.vocab_size)) {
    return absl::InvalidArgumentError(absl::StrCat("tokenizer: beginning-of-sequence token ", *bos,
                                                   " is outside the vocabulary"));
  }
  auto tokenizer = std::unique_ptr<BpeTokenizer>(new BpeTokenizer(std::move(impl)));
  tokenizer->bos_token_id_ = bos;
  return tokenizer;
}

}  // namespace moeserve::engine
