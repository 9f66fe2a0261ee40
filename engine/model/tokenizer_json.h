// Typed readers for the components of a Hugging Face `tokenizer.json` (normalizer,
// pre-tokenizer, model, decoder), shared by BpeTokenizer, BpeModel and TokenDecoder: a field of
// the wrong type is refused with a message naming it (nlohmann's accessors would throw), and a
// component moeserve does not implement is refused as unsupported rather than approximated.
//
// Stateless functions; thread-safe.
#pragma once

#include <unicode/regex.h>

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "nlohmann/json_fwd.hpp"

namespace moeserve::engine::tokenizer_json {

// INVALID_ARGUMENT "tokenizer: unsupported <what>".
absl::Status Unsupported(absl::string_view what);

// A component's `type`, or "" when it has none.
std::string TypeOf(const nlohmann::json& component);

// Optional fields: absent or null leaves `out` at its default; a value of another type is
// refused naming `component` and `key`.
absl::Status ReadOptional(const nlohmann::json& object, const char* key, bool* out,
                          absl::string_view component);
absl::Status ReadOptional(const nlohmann::json& object, const char* key, std::string* out,
                          absl::string_view component);
absl::Status ReadOptional(const nlohmann::json& object, const char* key, int64_t* out,
                          absl::string_view component);

// A `pattern` object: {"String": "literal text"} or {"Regex": "expression"}.
struct Pattern {
  std::string text;
  bool literal = true;
};
absl::StatusOr<Pattern> ReadPattern(const nlohmann::json& object, absl::string_view component);

// Compiles `regex` for ICU (Unicode properties such as \p{L}); `literal` matches it as plain text.
absl::StatusOr<std::unique_ptr<icu::RegexPattern>> CompileRegex(const std::string& regex,
                                                                bool literal);

// The number of UTF-8 characters of `text` (a truncated sequence counts as one).
int CountCharacters(std::string_view text);
// The byte length of the UTF-8 character that starts at text[index] (clamped to the text).
size_t CharacterLength(std::string_view text, size_t index);

// Byte-level BPE spells every byte as a printable character: bytes that are printable Latin-1
// keep their code point, the others (controls, space, a few more) take U+0100, U+0101, … in
// order. ByteLevelCharacter(b) is byte b's character (UTF-8); ByteOfByteLevelCharacter is the
// inverse, -1 for a character that spells no byte.
const std::string& ByteLevelCharacter(uint8_t byte);
int ByteOfByteLevelCharacter(std::string_view character);

// The Metaspace pre-tokenizer's and decoder's settings. Spaces are spelled `replacement` ("▁",
// U+2581, in every published file); `prepend_scheme` says where one is put in front of a piece
// of text: always, only before the piece that starts the text ("first"), or never. The older
// spelling `add_prefix_space` is read as the library reads it: false means never, true or
// absent means always unless `prepend_scheme` says otherwise.
struct MetaspaceOptions {
  enum class PrependScheme { kAlways, kFirst, kNever };
  std::string replacement;  // one character, UTF-8
  PrependScheme prepend_scheme = PrependScheme::kAlways;
  bool split = true;  // split pieces before each replacement character
};
absl::StatusOr<MetaspaceOptions> ReadMetaspace(const nlohmann::json& object,
                                               absl::string_view component);

}  // namespace moeserve::engine::tokenizer_json
