#include "engine/model/bpe_tokenizer.h"

#include <unicode/normalizer2.h>
#include <unicode/regex.h>
#include <unicode/unistr.h>

#include <algorithm>
#include <array>
#include <limits>
#include <unordered_set>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "engine/base/status_macros.h"
#include "engine/model/bpe_model.h"
#include "engine/model/token_decoder.h"
#include "engine/model/tokenizer_json.h"
#include "nlohmann/json.hpp"

namespace moeserve::engine {
namespace {

using tokenizer_json::CompileRegex;
using tokenizer_json::MetaspaceOptions;
using tokenizer_json::ReadOptional;
using tokenizer_json::TypeOf;
using tokenizer_json::Unsupported;

// GPT-2's pre-tokenizer regex, which ByteLevel applies when `use_regex` is true.
constexpr char kGpt2Pattern[] =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// One step of the normalizer: a Unicode normalization, a prefix put before non-empty text, or
// every match of a pattern replaced by literal content.
struct NormalizerStep {
  enum class Kind { kUnicode, kPrepend, kReplace };
  Kind kind = Kind::kUnicode;
  const icu::Normalizer2* unicode = nullptr;  // kUnicode
  std::string text;                           // kPrepend: the prefix; kReplace: the content
  std::string literal;                        // kReplace with a String pattern
  std::unique_ptr<icu::RegexPattern> regex;   // kReplace with a Regex pattern
};

enum class SplitBehavior { kIsolated, kRemoved, kMergedWithPrevious, kMergedWithNext };

// One step of the pre-tokenizer: a regex split (Split, Digits, ByteLevel's GPT-2 regex) or
// Metaspace.
struct SplitStep {
  std::unique_ptr<icu::RegexPattern> pattern;  // null: no regex split
  SplitBehavior behavior = SplitBehavior::kIsolated;
  bool add_prefix_space = false;  // ByteLevel's: each piece starts with a space before splitting
  std::optional<MetaspaceOptions> metaspace;  // set: this step is Metaspace
};

// A piece of text on its way through the pre-tokenizer; `at_text_start` when it begins at the
// start of the text given to Encode (Metaspace's "first" prepend scheme asks).
struct Piece {
  std::string text;
  bool at_text_start = false;
};

struct AddedToken {
  std::string content;
  // What is matched: the content itself, or, for tokens marked `normalized`, the content after
  // the normalizer (so Mixtral's Prepend turns "[INST]" into "▁[INST]").
  std::string match;
  int32_t id = 0;
  bool special = false;
  bool normalized = false;
};

// Added tokens by the first byte of what they match, longest first: the longest token that
// starts at a position wins, and the scan tries only tokens that can start there.
using AddedTokenIndex = std::array<std::vector<const AddedToken*>, 256>;

// A stretch of text between added tokens, or one added token.
struct Segment {
  std::string_view text;
  const AddedToken* token = nullptr;
  size_t offset = 0;  // in the text that was split
};

std::vector<Segment> SplitOnAddedTokens(std::string_view text, const AddedTokenIndex& index) {
  std::vector<Segment> segments;
  size_t plain_begin = 0;
  size_t i = 0;
  while (i < text.size()) {
    const AddedToken* match = nullptr;
    for (const AddedToken* token : index[static_cast<unsigned char>(text[i])]) {
      if (text.substr(i).starts_with(token->match)) {
        match = token;
        break;
      }
    }
    if (match == nullptr) {
      ++i;
      continue;
    }
    if (i > plain_begin) {
      segments.push_back({text.substr(plain_begin, i - plain_begin), nullptr, plain_begin});
    }
    segments.push_back({text.substr(i, match->match.size()), match, i});
    i += match->match.size();
    plain_begin = i;
  }
  if (plain_begin < text.size()) {
    segments.push_back({text.substr(plain_begin), nullptr, plain_begin});
  }
  return segments;
}

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

// The non-empty matches of `pattern` in `text`, as [begin, end) UTF-16 offsets, within the
// budget.
absl::StatusOr<std::vector<std::pair<int32_t, int32_t>>> FindMatches(
    const icu::RegexPattern& pattern, const icu::UnicodeString& text, RegexBudget& budget) {
  UErrorCode status = U_ZERO_ERROR;
  std::unique_ptr<icu::RegexMatcher> matcher(pattern.matcher(text, status));
  // ICU counts work units only while a time limit is set; the callback does the bounding,
  // across every match of this Encode call.
  if (U_SUCCESS(status)) matcher->setTimeLimit(std::numeric_limits<int32_t>::max(), status);
  if (U_SUCCESS(status)) matcher->setMatchCallback(&RegexWorkCallback, &budget, status);
  if (U_FAILURE(status)) {
    return absl::InternalError(
        absl::StrCat("tokenizer: cannot run a tokenizer regex: ", u_errorName(status)));
  }
  std::vector<std::pair<int32_t, int32_t>> matches;
  while (matcher->find(status) && U_SUCCESS(status)) {
    const int32_t begin = matcher->start(status);
    const int32_t end = matcher->end(status);
    if (end > begin) matches.emplace_back(begin, end);  // empty matches split nothing
  }
  if (budget.exhausted) {
    return absl::InvalidArgumentError(
        "the text needs more work to tokenize than the server allows one request (the "
        "tokenizer's pre-tokenizer regex backtracks heavily on it); shorten or change it");
  }
  if (U_FAILURE(status)) {
    return absl::InvalidArgumentError(
        absl::StrCat("the tokenizer's regex failed on the text: ", u_errorName(status)));
  }
  return matches;
}

std::string Utf8Of(const icu::UnicodeString& text, int32_t begin, int32_t end) {
  std::string out;
  text.tempSubStringBetween(begin, end).toUTF8String(out);
  return out;
}

// Metaspace on one piece: spaces become the replacement character, one is put in front as the
// prepend scheme says, and with `split` the piece is cut before each replacement character.
void ApplyMetaspace(const MetaspaceOptions& options, Piece piece, std::vector<Piece>& out) {
  absl::StrReplaceAll({{" ", options.replacement}}, &piece.text);
  const bool prepend =
      !piece.text.empty() && !piece.text.starts_with(options.replacement) &&
      (options.prepend_scheme == MetaspaceOptions::PrependScheme::kAlways ||
       (options.prepend_scheme == MetaspaceOptions::PrependScheme::kFirst && piece.at_text_start));
  if (prepend) piece.text.insert(0, options.replacement);
  if (!options.split) {
    out.push_back(std::move(piece));
    return;
  }
  // Each replacement character starts a new piece (the library's MergedWithNext).
  const std::string& mark = options.replacement;
  size_t begin = 0;
  for (size_t at = piece.text.find(mark, 1); at != std::string::npos;
       at = piece.text.find(mark, at + mark.size())) {
    out.push_back({piece.text.substr(begin, at - begin), piece.at_text_start && begin == 0});
    begin = at;
  }
  if (begin < piece.text.size()) {
    out.push_back({piece.text.substr(begin), piece.at_text_start && begin == 0});
  }
}

}  // namespace

struct BpeTokenizer::Impl {
  BpeModel model;
  TokenDecoder decoder;
  std::vector<std::unique_ptr<AddedToken>> added_tokens;
  std::unordered_map<int32_t, const AddedToken*> added_by_id;
  std::unordered_set<std::string> special_contents;
  AddedTokenIndex raw_added_tokens;         // matched in the text as given
  AddedTokenIndex normalized_added_tokens;  // matched in the normalized text
  std::vector<NormalizerStep> normalizer;   // applied in order
  std::vector<SplitStep> splits;            // applied in order
  bool byte_level = false;                  // pieces are spelled in the byte-level alphabet

  Impl(BpeModel model, TokenDecoder decoder)
      : model(std::move(model)), decoder(std::move(decoder)) {}

  absl::StatusOr<std::string> Normalize(std::string text, RegexBudget& budget) const;
  absl::StatusOr<std::vector<Piece>> PreTokenize(Piece piece, RegexBudget& budget) const;
  absl::Status EncodeStretch(std::string_view text, bool at_text_start, std::vector<int32_t>& ids,
                             RegexBudget& budget) const;
};

absl::StatusOr<std::string> BpeTokenizer::Impl::Normalize(std::string text,
                                                          RegexBudget& budget) const {
  for (const NormalizerStep& step : normalizer) {
    switch (step.kind) {
      case NormalizerStep::Kind::kUnicode: {
        UErrorCode status = U_ZERO_ERROR;
        const icu::UnicodeString normalized =
            step.unicode->normalize(icu::UnicodeString::fromUTF8(text), status);
        if (U_SUCCESS(status)) {
          text.clear();
          normalized.toUTF8String(text);
        }
        break;
      }
      case NormalizerStep::Kind::kPrepend:
        if (!text.empty()) text.insert(0, step.text);
        break;
      case NormalizerStep::Kind::kReplace:
        if (step.regex == nullptr) {
          absl::StrReplaceAll({{step.literal, step.text}}, &text);
          break;
        }
        {
          const icu::UnicodeString unicode = icu::UnicodeString::fromUTF8(text);
          ASSIGN_OR_RETURN(const auto matches, FindMatches(*step.regex, unicode, budget));
          std::string out;
          int32_t position = 0;
          for (const auto& [begin, end] : matches) {
            out += Utf8Of(unicode, position, begin);
            out += step.text;
            position = end;
          }
          out += Utf8Of(unicode, position, unicode.length());
          text = std::move(out);
        }
        break;
    }
  }
  return text;
}

absl::StatusOr<std::vector<Piece>> BpeTokenizer::Impl::PreTokenize(Piece whole,
                                                                   RegexBudget& budget) const {
  std::vector<Piece> pieces;
  pieces.push_back(std::move(whole));
  // Each step rewrites `pieces`.
  for (const SplitStep& step : splits) {
    std::vector<Piece> next;
    for (Piece& piece : pieces) {
      if (step.metaspace) {
        ApplyMetaspace(*step.metaspace, std::move(piece), next);
        continue;
      }
      if (step.add_prefix_space && (piece.text.empty() || piece.text[0] != ' '))
        piece.text.insert(piece.text.begin(), ' ');
      if (step.pattern == nullptr) {
        next.push_back(std::move(piece));
        continue;
      }
      const icu::UnicodeString unicode = icu::UnicodeString::fromUTF8(piece.text);
      ASSIGN_OR_RETURN(const auto matches, FindMatches(*step.pattern, unicode, budget));
      struct Part {
        int32_t begin, end;
        bool is_match;
      };
      std::vector<Part> parts;  // alternating: gap, match, gap, match, ..., gap
      int32_t position = 0;
      for (const auto& [begin, end] : matches) {
        if (begin > position) parts.push_back({position, begin, false});
        parts.push_back({begin, end, true});
        position = end;
      }
      if (position < unicode.length()) parts.push_back({position, unicode.length(), false});
      std::vector<Part> merged;
      for (size_t i = 0; i < parts.size(); ++i) {
        switch (step.behavior) {
          case SplitBehavior::kIsolated:
            merged.push_back(parts[i]);
            break;
          case SplitBehavior::kRemoved:
            if (!parts[i].is_match) merged.push_back(parts[i]);
            break;
          case SplitBehavior::kMergedWithPrevious:
            if (parts[i].is_match && !merged.empty() && !parts[i - 1].is_match)
              merged.back().end = parts[i].end;
            else
              merged.push_back(parts[i]);
            break;
          case SplitBehavior::kMergedWithNext:
            if (i > 0 && parts[i - 1].is_match && !parts[i].is_match)
              merged.back().end = parts[i].end;
            else
              merged.push_back(parts[i]);
            break;
        }
      }
      for (const Part& part : merged) {
        next.push_back(
            {Utf8Of(unicode, part.begin, part.end), piece.at_text_start && part.begin == 0});
      }
    }
    pieces = std::move(next);
  }
  return pieces;
}

absl::Status BpeTokenizer::Impl::EncodeStretch(std::string_view raw, bool at_text_start,
                                               std::vector<int32_t>& ids,
                                               RegexBudget& budget) const {
  ASSIGN_OR_RETURN(const std::string text, Normalize(std::string(raw), budget));
  for (const Segment& segment : SplitOnAddedTokens(text, normalized_added_tokens)) {
    if (segment.token != nullptr) {
      ids.push_back(segment.token->id);
      continue;
    }
    ASSIGN_OR_RETURN(
        std::vector<Piece> pieces,
        PreTokenize({std::string(segment.text), at_text_start && segment.offset == 0}, budget));
    for (const Piece& piece : pieces) {
      if (!byte_level) {
        model.EncodeWord(piece.text, ids);
        continue;
      }
      std::string word;
      for (unsigned char byte : piece.text) word += tokenizer_json::ByteLevelCharacter(byte);
      model.EncodeWord(word, ids);
    }
  }
  return absl::OkStatus();
}

BpeTokenizer::BpeTokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
BpeTokenizer::~BpeTokenizer() = default;

absl::StatusOr<std::vector<int32_t>> BpeTokenizer::EncodeWithoutBos(std::string_view text) const {
  RegexBudget budget{kRegexWorkUnitsBase +
                     static_cast<int64_t>(text.size()) / kRegexBytesPerWorkUnit};
  std::vector<int32_t> ids;
  for (const Segment& segment : SplitOnAddedTokens(text, impl_->raw_added_tokens)) {
    if (segment.token != nullptr) {
      ids.push_back(segment.token->id);
      continue;
    }
    RETURN_IF_ERROR(impl_->EncodeStretch(segment.text, segment.offset == 0, ids, budget));
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
    return it->second->special ? "" : impl_->decoder.TokenBytes(it->second->content);
  }
  const std::string* text = impl_->model.TokenOf(token);
  if (text == nullptr || impl_->special_contents.contains(*text)) return "";
  return impl_->decoder.TokenBytes(*text);
}

std::string BpeTokenizer::Decode(const std::vector<int32_t>& ids, bool skip_special_tokens) const {
  std::vector<std::string> tokens;
  tokens.reserve(ids.size());
  for (int32_t id : ids) {
    const std::string* text = nullptr;
    if (auto it = impl_->added_by_id.find(id); it != impl_->added_by_id.end()) {
      text = &it->second->content;
    } else {
      text = impl_->model.TokenOf(id);
    }
    if (text == nullptr) continue;
    if (skip_special_tokens && impl_->special_contents.contains(*text)) continue;
    tokens.push_back(*text);
  }
  return impl_->decoder.Decode(std::move(tokens));
}

namespace {

absl::Status AddNormalizer(const nlohmann::json& normalizer, std::vector<NormalizerStep>& steps) {
  if (normalizer.is_null()) return absl::OkStatus();
  const std::string type = TypeOf(normalizer);
  if (type == "Sequence") {
    auto list = normalizer.find("normalizers");
    if (list == normalizer.end() || !list->is_array())
      return Unsupported("normalizer Sequence without a list");
    for (const nlohmann::json& item : *list) {
      RETURN_IF_ERROR(AddNormalizer(item, steps));
    }
    return absl::OkStatus();
  }
  NormalizerStep step;
  if (type == "Prepend") {
    step.kind = NormalizerStep::Kind::kPrepend;
    RETURN_IF_ERROR(ReadOptional(normalizer, "prepend", &step.text, "normalizer Prepend"));
    steps.push_back(std::move(step));
    return absl::OkStatus();
  }
  if (type == "Replace") {
    step.kind = NormalizerStep::Kind::kReplace;
    ASSIGN_OR_RETURN(const tokenizer_json::Pattern pattern,
                     tokenizer_json::ReadPattern(normalizer, "normalizer Replace"));
    if (pattern.literal) {
      step.literal = pattern.text;
    } else {
      ASSIGN_OR_RETURN(step.regex, CompileRegex(pattern.text, false));
    }
    RETURN_IF_ERROR(ReadOptional(normalizer, "content", &step.text, "normalizer Replace"));
    steps.push_back(std::move(step));
    return absl::OkStatus();
  }
  UErrorCode status = U_ZERO_ERROR;
  if (type == "NFC")
    step.unicode = icu::Normalizer2::getNFCInstance(status);
  else if (type == "NFD")
    step.unicode = icu::Normalizer2::getNFDInstance(status);
  else if (type == "NFKC")
    step.unicode = icu::Normalizer2::getNFKCInstance(status);
  else if (type == "NFKD")
    step.unicode = icu::Normalizer2::getNFKDInstance(status);
  else
    return Unsupported(absl::StrCat(
        "normalizer `", type, "` (supported: NFC, NFD, NFKC, NFKD, Prepend, Replace, Sequence)"));
  if (U_FAILURE(status)) return absl::InternalError("tokenizer: ICU normalizer unavailable");
  steps.push_back(std::move(step));
  return absl::OkStatus();
}

// Flattens the pre-tokenizer into split steps. A ByteLevel step must be the last.
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
    RETURN_IF_ERROR(ReadOptional(step, "add_prefix_space", &byte_level_step.add_prefix_space,
                                 "pre_tokenizer ByteLevel"));
    RETURN_IF_ERROR(ReadOptional(step, "use_regex", &use_regex, "pre_tokenizer ByteLevel"));
    if (use_regex) {
      ASSIGN_OR_RETURN(byte_level_step.pattern, CompileRegex(kGpt2Pattern, false));
    }
    splits.push_back(std::move(byte_level_step));
    return absl::OkStatus();
  }
  if (type == "Metaspace") {
    SplitStep metaspace_step;
    ASSIGN_OR_RETURN(metaspace_step.metaspace,
                     tokenizer_json::ReadMetaspace(step, "pre_tokenizer"));
    splits.push_back(std::move(metaspace_step));
    return absl::OkStatus();
  }
  if (type == "Digits") {
    bool individual = false;
    RETURN_IF_ERROR(ReadOptional(step, "individual_digits", &individual, "pre_tokenizer Digits"));
    SplitStep digits;
    ASSIGN_OR_RETURN(digits.pattern, CompileRegex(individual ? R"(\p{N})" : R"(\p{N}+)", false));
    splits.push_back(std::move(digits));
    return absl::OkStatus();
  }
  if (type == "Split") {
    bool invert = false;
    std::string behavior = "Isolated";
    RETURN_IF_ERROR(ReadOptional(step, "invert", &invert, "pre_tokenizer Split"));
    if (invert) return Unsupported("pre_tokenizer Split with `invert`");
    RETURN_IF_ERROR(ReadOptional(step, "behavior", &behavior, "pre_tokenizer Split"));
    SplitStep split;
    if (behavior == "Isolated")
      split.behavior = SplitBehavior::kIsolated;
    else if (behavior == "Removed")
      split.behavior = SplitBehavior::kRemoved;
    else if (behavior == "MergedWithPrevious")
      split.behavior = SplitBehavior::kMergedWithPrevious;
    else if (behavior == "MergedWithNext")
      split.behavior = SplitBehavior::kMergedWithNext;
    else
      return Unsupported(absl::StrCat("pre_tokenizer Split behavior `", behavior, "`"));
    ASSIGN_OR_RETURN(const tokenizer_json::Pattern pattern,
                     tokenizer_json::ReadPattern(step, "pre_tokenizer Split"));
    ASSIGN_OR_RETURN(split.pattern, CompileRegex(pattern.text, pattern.literal));
    splits.push_back(std::move(split));
    return absl::OkStatus();
  }
  return Unsupported(absl::StrCat("pre_tokenizer `", type,
                                  "` (supported: ByteLevel, Metaspace, Split, Digits, Sequence)"));
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
  const nlohmann::json model_json = json.value("model", nlohmann::json());
  if (TypeOf(model_json) != "BPE")
    return Unsupported(absl::StrCat("model `", TypeOf(model_json), "` (only BPE)"));
  ASSIGN_OR_RETURN(BpeModel model, BpeModel::Create(model_json, config.vocab_size));

  std::vector<NormalizerStep> normalizer;
  RETURN_IF_ERROR(AddNormalizer(json.value("normalizer", nlohmann::json()), normalizer));
  std::vector<SplitStep> splits;
  bool byte_level = false;
  const nlohmann::json pre_tokenizer = json.value("pre_tokenizer", nlohmann::json());
  if (!pre_tokenizer.is_null()) {
    RETURN_IF_ERROR(AddPreTokenizer(pre_tokenizer, splits, &byte_level));
  }
  const nlohmann::json decoder_json = json.value("decoder", nlohmann::json());
  TokenDecoder decoder = TokenDecoder::ByteLevel();
  // A byte-level file without a decoder still means its bytes (moeserve always decoded those so).
  if (!decoder_json.is_null() || !byte_level) {
    ASSIGN_OR_RETURN(decoder, TokenDecoder::Create(decoder_json));
  }

  auto impl = std::make_unique<Impl>(std::move(model), std::move(decoder));
  impl->normalizer = std::move(normalizer);
  impl->splits = std::move(splits);
  impl->byte_level = byte_level;

  auto check_id = [&](const std::string& token, const nlohmann::json& id) -> absl::Status {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 ||
        id.get<int64_t>() >= config.vocab_size) {
      return absl::InvalidArgumentError(
          absl::StrCat("tokenizer: token `", token, "` has id ", id.dump(),
                       ", outside the model's vocabulary of ", config.vocab_size));
    }
    return absl::OkStatus();
  };
  if (auto added = json.find("added_tokens"); added != json.end() && added->is_array()) {
    for (const nlohmann::json& token : *added) {
      std::optional<std::string> content = TokenContent(token);
      if (!content || content->empty() || !token.contains("id")) {
        return absl::InvalidArgumentError(
            absl::StrCat("tokenizer: malformed added token ", token.dump()));
      }
      RETURN_IF_ERROR(check_id(*content, token["id"]));
      auto entry = std::make_unique<AddedToken>();
      entry->content = *content;
      entry->id = token["id"].get<int32_t>();
      RETURN_IF_ERROR(ReadOptional(token, "special", &entry->special, "added token"));
      RETURN_IF_ERROR(ReadOptional(token, "normalized", &entry->normalized, "added token"));
      entry->match = entry->content;
      if (entry->normalized) {
        // The library matches such tokens in normalized text, so it normalizes them too. No
        // regex in a normalizer backtracks far on a token, so a fixed budget suffices.
        RegexBudget budget{kRegexWorkUnitsBase};
        ASSIGN_OR_RETURN(entry->match, impl->Normalize(entry->content, budget));
        if (entry->match.empty()) entry->match = entry->content;
      }
      if (entry->special) impl->special_contents.insert(entry->content);
      impl->added_by_id[entry->id] = entry.get();
      impl->added_tokens.push_back(std::move(entry));
    }
    for (const auto& token : impl->added_tokens) {
      AddedTokenIndex& index =
          token->normalized ? impl->normalized_added_tokens : impl->raw_added_tokens;
      index[static_cast<unsigned char>(token->match[0])].push_back(token.get());
    }
    for (AddedTokenIndex* index : {&impl->raw_added_tokens, &impl->normalized_added_tokens}) {
      for (auto& tokens : *index) {
        std::stable_sort(tokens.begin(), tokens.end(),
                         [](const AddedToken* a, const AddedToken* b) {
                           return a->match.size() > b->match.size();
                         });
      }
    }
  }

  // Beginning of sequence: tokenizer_config.json's add_bos_token decides when it is given;
  // otherwise a post-processor template that starts with a special token.
  auto find_id = [&](const std::string& content) -> std::optional<int32_t> {
    for (const auto& token : impl->added_tokens) {
      if (token->content == content) return token->id;
    }
    return impl->model.IdOf(content);
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
        RETURN_IF_ERROR(ReadOptional(special, "id", &name, "post_processor SpecialToken"));
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
