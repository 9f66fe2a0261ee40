#include "engine/model/token_decoder.h"

#include <optional>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "engine/base/status_macros.h"
#include "engine/model/tokenizer.h"
#include "engine/model/tokenizer_json.h"
#include "nlohmann/json.hpp"

namespace moeserve::engine {
namespace {

using tokenizer_json::CharacterLength;
using tokenizer_json::ReadOptional;
using tokenizer_json::TypeOf;
using tokenizer_json::Unsupported;

constexpr std::string_view kReplacementCharacter = "\xEF\xBF\xBD";  // U+FFFD

// The bytes a byte-level token spells, or the token's own UTF-8 when one of its characters
// spells no byte (the library keeps such a token as it is).
std::string ByteLevelBytes(std::string_view token) {
  std::string bytes;
  for (size_t i = 0; i < token.size();) {
    const size_t length = CharacterLength(token, i);
    const int byte = tokenizer_json::ByteOfByteLevelCharacter(token.substr(i, length));
    if (byte < 0) return std::string(token);
    bytes.push_back(static_cast<char>(byte));
    i += length;
  }
  return bytes;
}

// The byte of a ByteFallback token: "<0x" + two hex digits + ">", read as the library reads it
// (Rust's from_str_radix, which also takes "+" and one digit).
std::optional<uint8_t> FallbackByte(std::string_view token) {
  if (token.size() != 6 || !token.starts_with("<0x") || token[5] != '>') return std::nullopt;
  auto digit = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  const int high = digit(token[3]);
  const int low = digit(token[4]);
  if (token[3] == '+' && low >= 0) return static_cast<uint8_t>(low);
  if (high < 0 || low < 0) return std::nullopt;
  return static_cast<uint8_t>(high * 16 + low);
}

bool IsValidUtf8(std::string_view bytes) {
  Utf8StreamDecoder decoder;
  const std::string text = decoder.Push(bytes);
  return decoder.pending().empty() && text == bytes;
}

// `bytes` as text, each invalid sequence replaced by U+FFFD (Rust's from_utf8_lossy).
std::string LossyUtf8(std::string_view bytes) {
  Utf8StreamDecoder decoder;
  std::string text = decoder.Push(bytes);
  return text + decoder.Flush();
}

// Removes up to `start` leading and `stop` trailing copies of the character `strip`.
std::string Strip(std::string_view token, std::string_view strip, int64_t start, int64_t stop) {
  std::vector<std::string_view> characters;
  for (size_t i = 0; i < token.size();) {
    const size_t length = CharacterLength(token, i);
    characters.push_back(token.substr(i, length));
    i += length;
  }
  size_t begin = 0;
  while (begin < characters.size() && static_cast<int64_t>(begin) < start &&
         characters[begin] == strip) {
    ++begin;
  }
  size_t end = characters.size();
  while (end > begin && static_cast<int64_t>(characters.size() - end) < stop &&
         characters[end - 1] == strip) {
    --end;
  }
  std::string out;
  for (size_t i = begin; i < end; ++i) out.append(characters[i]);
  return out;
}

// Metaspace: the replacement character is a space, or nothing when `drop` (the library drops
// every one of them in the first token unless the prepend scheme is never).
std::string MetaspaceText(std::string_view token, std::string_view replacement, bool drop) {
  std::string out;
  for (size_t i = 0; i < token.size();) {
    const size_t length = CharacterLength(token, i);
    const std::string_view character = token.substr(i, length);
    if (character != replacement) {
      out.append(character);
    } else if (!drop) {
      out.push_back(' ');
    }
    i += length;
  }
  return out;
}

}  // namespace

absl::Status TokenDecoder::AddSteps(const nlohmann::json& decoder, std::vector<Step>& steps) {
  const std::string type = TypeOf(decoder);
  Step step;
  if (type == "Sequence") {
    auto list = decoder.find("decoders");
    if (list == decoder.end() || !list->is_array()) {
      return Unsupported("decoder Sequence without a list");
    }
    for (const nlohmann::json& item : *list) RETURN_IF_ERROR(AddSteps(item, steps));
    return absl::OkStatus();
  }
  if (type == "ByteLevel") {
    step.kind = Step::Kind::kByteLevel;
  } else if (type == "ByteFallback") {
    step.kind = Step::Kind::kByteFallback;
  } else if (type == "Fuse") {
    step.kind = Step::Kind::kFuse;
  } else if (type == "Replace") {
    step.kind = Step::Kind::kReplace;
    ASSIGN_OR_RETURN(const tokenizer_json::Pattern pattern,
                     tokenizer_json::ReadPattern(decoder, "decoder Replace"));
    if (!pattern.literal || pattern.text.empty()) {
      return Unsupported("decoder Replace with a regex or an empty pattern");
    }
    step.pattern = pattern.text;
    RETURN_IF_ERROR(ReadOptional(decoder, "content", &step.content, "decoder Replace"));
  } else if (type == "Strip") {
    step.kind = Step::Kind::kStrip;
    RETURN_IF_ERROR(ReadOptional(decoder, "content", &step.pattern, "decoder Strip"));
    if (tokenizer_json::CountCharacters(step.pattern) != 1) {
      return absl::InvalidArgumentError("tokenizer: decoder Strip `content` must be one character");
    }
    RETURN_IF_ERROR(ReadOptional(decoder, "start", &step.strip_start, "decoder Strip"));
    RETURN_IF_ERROR(ReadOptional(decoder, "stop", &step.strip_stop, "decoder Strip"));
  } else if (type == "Metaspace") {
    step.kind = Step::Kind::kMetaspace;
    ASSIGN_OR_RETURN(const tokenizer_json::MetaspaceOptions options,
                     tokenizer_json::ReadMetaspace(decoder, "decoder"));
    step.pattern = options.replacement;
    step.drop_first_token_replacement =
        options.prepend_scheme != tokenizer_json::MetaspaceOptions::PrependScheme::kNever;
  } else {
    return Unsupported(absl::StrCat(
        "decoder `", type,
        "` (supported: ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace, Sequence)"));
  }
  steps.push_back(std::move(step));
  return absl::OkStatus();
}

absl::StatusOr<TokenDecoder> TokenDecoder::Create(const nlohmann::json& decoder) {
  TokenDecoder out;
  if (decoder.is_null()) {
    out.join_with_spaces_ = true;
    return out;
  }
  RETURN_IF_ERROR(AddSteps(decoder, out.steps_));
  return out;
}

TokenDecoder TokenDecoder::ByteLevel() {
  TokenDecoder out;
  Step step;
  step.kind = Step::Kind::kByteLevel;
  out.steps_.push_back(std::move(step));
  return out;
}

std::string TokenDecoder::Decode(std::vector<std::string> tokens) const {
  if (join_with_spaces_) return absl::StrJoin(tokens, " ");
  for (const Step& step : steps_) {
    switch (step.kind) {
      case Step::Kind::kByteLevel: {
        std::string bytes;
        for (const std::string& token : tokens) bytes += ByteLevelBytes(token);
        tokens = {LossyUtf8(bytes)};
        break;
      }
      case Step::Kind::kReplace:
        for (std::string& token : tokens)
          absl::StrReplaceAll({{step.pattern, step.content}}, &token);
        break;
      case Step::Kind::kByteFallback: {
        std::vector<std::string> out;
        std::string run;  // bytes of consecutive byte tokens
        int run_tokens = 0;
        auto flush = [&] {
          if (run_tokens == 0) return;
          if (IsValidUtf8(run)) {
            out.push_back(run);
          } else {
            for (int i = 0; i < run_tokens; ++i) out.emplace_back(kReplacementCharacter);
          }
          run.clear();
          run_tokens = 0;
        };
        for (std::string& token : tokens) {
          if (std::optional<uint8_t> byte = FallbackByte(token)) {
            run.push_back(static_cast<char>(*byte));
            ++run_tokens;
            continue;
          }
          flush();
          out.push_back(std::move(token));
        }
        flush();
        tokens = std::move(out);
        break;
      }
      case Step::Kind::kFuse:
        tokens = {absl::StrJoin(tokens, "")};
        break;
      case Step::Kind::kStrip:
        for (std::string& token : tokens) {
          token = Strip(token, step.pattern, step.strip_start, step.strip_stop);
        }
        break;
      case Step::Kind::kMetaspace:
        for (size_t i = 0; i < tokens.size(); ++i) {
          tokens[i] =
              MetaspaceText(tokens[i], step.pattern, i == 0 && step.drop_first_token_replacement);
        }
        break;
    }
  }
  return absl::StrJoin(tokens, "");
}

std::string TokenDecoder::TokenBytes(std::string_view token) const {
  std::string text(token);
  if (join_with_spaces_) return text;
  bool fused = false;  // later steps see the whole text, not this token
  for (const Step& step : steps_) {
    switch (step.kind) {
      case Step::Kind::kByteLevel:
        text = ByteLevelBytes(text);
        fused = true;
        break;
      case Step::Kind::kReplace:
        absl::StrReplaceAll({{step.pattern, step.content}}, &text);
        break;
      case Step::Kind::kByteFallback:
        if (std::optional<uint8_t> byte = FallbackByte(text)) {
          text = std::string(1, static_cast<char>(*byte));
        }
        break;
      case Step::Kind::kFuse:
        fused = true;
        break;
      case Step::Kind::kStrip:
        if (!fused) text = Strip(text, step.pattern, step.strip_start, step.strip_stop);
        break;
      case Step::Kind::kMetaspace:
        text = MetaspaceText(text, step.pattern, /*drop=*/false);
        break;
    }
  }
  return text;
}

}  // namespace moeserve::engine
