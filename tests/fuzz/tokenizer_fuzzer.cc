// Fuzzes tokenizer.json loading and encoding. Input: the tokenizer.json text, a NUL byte, then
// the text to encode (a missing NUL: the whole input is the JSON and the text is empty). Loading
// must refuse malformed files with a status; encoding must stay within its regex work bound.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "base/bounded_json.h"
#include "engine/model/bpe_tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  const size_t separator = input.find('\0');
  const std::string_view json_text = input.substr(0, separator);
  const std::string_view text =
      separator == std::string_view::npos ? std::string_view() : input.substr(separator + 1);
  absl::StatusOr<nlohmann::json> json = moeserve::base::ParseBoundedJson(json_text);
  if (!json.ok()) return 0;
  moeserve::engine::ModelConfig config;
  config.vocab_size = 512;
  config.bos_token_id = 1;
  config.eos_token_id = 2;
  absl::StatusOr<std::unique_ptr<moeserve::engine::BpeTokenizer>> tokenizer =
      moeserve::engine::BpeTokenizer::Create(*json, nlohmann::json::object(), config);
  if (!tokenizer.ok()) return 0;
  absl::StatusOr<std::vector<int32_t>> ids = (*tokenizer)->Encode(text);
  if (ids.ok()) {
    for (int32_t id : *ids) {
      if (id < 0 || id >= config.vocab_size) __builtin_trap();  // ids stay in the vocabulary
      (void)(*tokenizer)->TokenBytes(id);
    }
  }
  return 0;
}
