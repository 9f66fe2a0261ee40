// TokenDecoder: the `decoder` of a Hugging Face tokenizer.json, which turns token strings back
// into text. Supported steps: ByteLevel (DeepSeek, Qwen: each character of a token stands for a
// byte), Replace with a literal pattern ("▁" → " " in Mixtral's), ByteFallback (`<0xNN>` tokens
// are bytes), Fuse, Strip, Metaspace ("▁" is a space; the text's first one is dropped) and a
// Sequence of them; anything else is refused when the tokenizer loads.
//
// Two uses:
// - Decode: the text of a whole sequence, exactly as the `tokenizers` library's decode gives it
//   (a run of byte tokens that is not valid UTF-8 becomes one U+FFFD per byte, as there).
// - TokenBytes: the bytes one token adds in the middle of a text, which is what a server streams
//   for each generated token. Steps that act only on the text's start — Strip after a Fuse,
//   Metaspace's first-token rule — do not apply, so a generated "▁Hello" streams " Hello", as
//   incremental detokenizers that decode generated tokens after the prompt give it; byte tokens
//   stay raw bytes, which the stream's Utf8StreamDecoder joins into characters.
//
// Immutable after Create; safe to share between threads.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json_fwd.hpp"

namespace moeserve::engine {

class TokenDecoder {
 public:
  // `decoder` is tokenizer.json's field; null joins tokens with spaces, as the library does.
  static absl::StatusOr<TokenDecoder> Create(const nlohmann::json& decoder);
  // The ByteLevel decoder alone.
  static TokenDecoder ByteLevel();

  std::string Decode(std::vector<std::string> tokens) const;
  std::string TokenBytes(std::string_view token) const;

 private:
  struct Step {
    enum class Kind { kByteLevel, kReplace, kByteFallback, kFuse, kStrip, kMetaspace };
    Kind kind = Kind::kFuse;
    std::string pattern;      // kReplace: the literal text to replace; kStrip, kMetaspace: the
                              // character stripped or read as a space
    std::string content;      // kReplace: what replaces it
    int64_t strip_start = 0;  // kStrip: at most this many characters from the start
    int64_t strip_stop = 0;   // and from the end
    bool drop_first_token_replacement = false;  // kMetaspace: prepend scheme other than never
  };
  static absl::Status AddSteps(const nlohmann::json& decoder, std::vector<Step>& steps);

  std::vector<Step> steps_;
  bool join_with_spaces_ = false;  // no decoder at all
};

}  // namespace moeserve::engine
