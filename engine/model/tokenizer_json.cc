#include "engine/model/tokenizer_json.h"

#include <unicode/unistr.h>

#include <algorithm>
#include <array>
#include <unordered_map>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace moeserve::engine::tokenizer_json {

absl::Status Unsupported(absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("tokenizer: unsupported ", what));
}

std::string TypeOf(const nlohmann::json& component) {
  if (!component.is_object()) return "";
  auto it = component.find("type");
  return it != component.end() && it->is_string() ? it->get<std::string>() : "";
}

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

absl::Status ReadOptional(const nlohmann::json& object, const char* key, int64_t* out,
                          absl::string_view component) {
  auto it = object.find(key);
  if (it == object.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_number_integer() || it->get<int64_t>() < 0) {
    return absl::InvalidArgumentError(absl::StrCat("tokenizer: ", component, " `", key,
                                                   "` must be a non-negative integer, got ",
                                                   it->dump().substr(0, 64)));
  }
  *out = it->get<int64_t>();
  return absl::OkStatus();
}

absl::StatusOr<Pattern> ReadPattern(const nlohmann::json& object, absl::string_view component) {
  auto pattern = object.find("pattern");
  if (pattern == object.end() || !pattern->is_object()) {
    return Unsupported(absl::StrCat(component, " without a pattern"));
  }
  Pattern out;
  out.literal = pattern->contains("String");
  auto text = pattern->find(out.literal ? "String" : "Regex");
  if (text == pattern->end() || !text->is_string()) {
    return Unsupported(absl::StrCat(component, " pattern (needs Regex or String)"));
  }
  out.text = text->get<std::string>();
  return out;
}

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

size_t CharacterLength(std::string_view text, size_t index) {
  const auto lead = static_cast<unsigned char>(text[index]);
  const size_t length = lead < 0x80 ? 1 : lead < 0xE0 ? 2 : lead < 0xF0 ? 3 : 4;
  return std::min(length, text.size() - index);
}

int CountCharacters(std::string_view text) {
  int count = 0;
  for (size_t i = 0; i < text.size(); i += CharacterLength(text, i)) ++count;
  return count;
}

namespace {

struct ByteLevelTables {
  std::array<std::string, 256> character_of_byte;
  std::unordered_map<std::string, uint8_t> byte_of_character;
};

const ByteLevelTables& Tables() {
  static const ByteLevelTables* const tables = [] {
    auto* t = new ByteLevelTables;
    UChar32 next = 256;
    for (int byte = 0; byte < 256; ++byte) {
      const bool printable =
          (byte >= 33 && byte <= 126) || (byte >= 161 && byte <= 172) || byte >= 174;
      icu::UnicodeString(printable ? byte : next++).toUTF8String(t->character_of_byte[byte]);
      t->byte_of_character[t->character_of_byte[byte]] = static_cast<uint8_t>(byte);
    }
    return t;
  }();
  return *tables;
}

}  // namespace

const std::string& ByteLevelCharacter(uint8_t byte) { return Tables().character_of_byte[byte]; }

int ByteOfByteLevelCharacter(std::string_view character) {
  const auto& map = Tables().byte_of_character;
  auto it = map.find(std::string(character));
  return it == map.end() ? -1 : it->second;
}

absl::StatusOr<MetaspaceOptions> ReadMetaspace(const nlohmann::json& object,
                                               absl::string_view component) {
  MetaspaceOptions options;
  const std::string where = absl::StrCat(component, " Metaspace");
  auto replacement = object.find("replacement");
  if (replacement == object.end() || !replacement->is_string() ||
      CountCharacters(replacement->get<std::string>()) != 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("tokenizer: ", where, " `replacement` must be one character"));
  }
  options.replacement = replacement->get<std::string>();
  if (absl::Status s = ReadOptional(object, "split", &options.split, where); !s.ok()) return s;
  std::string scheme;
  if (absl::Status s = ReadOptional(object, "prepend_scheme", &scheme, where); !s.ok()) return s;
  if (scheme == "always" || scheme.empty()) {
    options.prepend_scheme = MetaspaceOptions::PrependScheme::kAlways;
  } else if (scheme == "first") {
    options.prepend_scheme = MetaspaceOptions::PrependScheme::kFirst;
  } else if (scheme == "never") {
    options.prepend_scheme = MetaspaceOptions::PrependScheme::kNever;
  } else {
    return Unsupported(
        absl::StrCat(where, " prepend_scheme `", scheme, "` (supported: always, first, never)"));
  }
  bool add_prefix_space = true;
  if (absl::Status s = ReadOptional(object, "add_prefix_space", &add_prefix_space, where); !s.ok())
    return s;
  if (!add_prefix_space) {
    if (!scheme.empty() && scheme != "never") {
      return absl::InvalidArgumentError(
          absl::StrCat("tokenizer: ", where,
                       " `add_prefix_space` false contradicts prepend_scheme `", scheme, "`"));
    }
    options.prepend_scheme = MetaspaceOptions::PrependScheme::kNever;
  }
  return options;
}

}  // namespace moeserve::engine::tokenizer_json
