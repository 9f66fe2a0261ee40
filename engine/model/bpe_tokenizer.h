// BpeTokenizer: the BPE tokenizers models ship as `tokenizer.json` (Hugging Face `tokenizers`
// format): byte-level BPE as DeepSeek and Qwen ship it, and SentencePiece-style BPE with byte
// fallback and "▁" for spaces as Mixtral, Mistral and Llama 2 ship it.
//
// Encoding is the library's pipeline: added/special tokens are cut out of the text first
// (longest match; those marked `normalized` are matched in the normalized text); every other
// stretch is normalized (NFC, NFD, NFKC, NFKD, Prepend, Replace, in sequence), split by the
// pre-tokenizer (Split regexes with Unicode classes, Digits, ByteLevel with its GPT-2 regex,
// Metaspace), and each piece is encoded by the BPE model (bpe_model.h: ranked merges, byte
// fallback, the unknown token). A beginning-of-sequence token is put first when
// tokenizer_config.json says `add_bos_token` or the post-processor's template starts with a
// special token. Decoding follows the file's decoder (token_decoder.h).
//
// Built once by LoadModel; every method is const and safe to call from many threads. Regexes
// run on ICU (Unicode properties such as \p{L} and \p{N}). A regex can backtrack for
// minutes on a short text, so the regex work of one Encode is bounded (kRegexWorkUnitsBase +
// one unit per kRegexBytesPerWorkUnit bytes of text, a unit being 10,000 backtracking steps of
// ICU's matcher); beyond it Encode fails instead of stalling its caller.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/model/model_config.h"
#include "engine/model/tokenizer.h"
#include "nlohmann/json_fwd.hpp"

namespace moeserve::engine {

class BpeTokenizer : public Tokenizer {
 public:
  // The regex work one Encode may do (see above). Ordinary pre-tokenizer patterns need one
  // unit per 1.5 KB (Qwen's) to 2.5 KB (GPT-2's) of text, a tenth of the bound or less; a
  // pattern that backtracks without end is stopped after about 0.25 ms per unit, well under a
  // second for a 10 KB text.
  static constexpr int64_t kRegexWorkUnitsBase = 100;
  static constexpr int64_t kRegexBytesPerWorkUnit = 128;

  // INVALID_ARGUMENT for malformed files, components other than the ones listed above, or token
  // ids outside the model's vocabulary. `tokenizer_config` may be an empty object.
  static absl::StatusOr<std::unique_ptr<BpeTokenizer>> Create(
      const nlohmann::json& tokenizer_json, const nlohmann::json& tokenizer_config,
      const ModelConfig& config);
  ~BpeTokenizer() override;

  absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text) const override;
  std::string TokenBytes(int32_t token) const override;

  absl::StatusOr<std::vector<int32_t>> EncodeWithoutBos(std::string_view text) const override;
  std::optional<int32_t> bos_token_id() const { return bos_token_id_; }

  // The text of `ids` as the library's decode(ids, skip_special_tokens) gives it: unlike the
  // concatenated TokenBytes, the decoder's start-of-text rules apply (Mixtral's Strip drops the
  // first token's leading space) and invalid UTF-8 becomes U+FFFD. Unknown ids are left out.
  std::string Decode(const std::vector<int32_t>& ids, bool skip_special_tokens = true) const;

 private:
  struct Impl;
  explicit BpeTokenizer(std::unique_ptr<Impl> impl);
  static absl::StatusOr<std::unique_ptr<BpeTokenizer>> CreateChecked(
      const nlohmann::json& tokenizer_json, const nlohmann::json& tokenizer_config,
      const ModelConfig& config);

  std::unique_ptr<Impl> impl_;
  std::optional<int32_t> bos_token_id_;
};

}  // namespace moeserve::engine
