// BpeModel: the `model` of a Hugging Face tokenizer.json whose type is BPE: the vocabulary, the
// ranked merges, and what becomes of a character the vocabulary lacks — its UTF-8 bytes as
// `<0xNN>` tokens with `byte_fallback` (SentencePiece-style files: Mixtral, Mistral, Llama 2),
// else the unknown token (runs of them fused into one with `fuse_unk`), else nothing. Byte-level
// files (DeepSeek, Qwen) need none of that: their pre-tokenizer already spelled every byte with
// a character of the vocabulary.
//
// EncodeWord turns one pre-tokenized piece into ids exactly as the `tokenizers` library does:
// characters (or their byte tokens) first, then the lowest-ranked adjacent pair is merged
// (leftmost first among equals) until no pair has a merge; with `ignore_merges` a piece that is
// itself in the vocabulary is that token. A priority queue over a linked list makes this
// O(n log n), which matters where the whole text is one piece (Mixtral has no pre-tokenizer).
//
// Built once by BpeTokenizer::Create; immutable afterwards, so every method is safe to call from
// many threads.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json_fwd.hpp"

namespace moeserve::engine {

class BpeModel {
 public:
  // Reads tokenizer.json's `model` object (type BPE). INVALID_ARGUMENT for a malformed model, a
  // token id outside [0, vocab_size), a merge whose parts or result are not in the vocabulary
  // (the library refuses such files too), or a `continuing_subword_prefix` /
  // `end_of_word_suffix` (WordPiece-style BPE, which no supported model uses).
  static absl::StatusOr<BpeModel> Create(const nlohmann::json& model, int vocab_size);

  // Appends the ids of `word` (UTF-8) to `ids`.
  void EncodeWord(std::string_view word, std::vector<int32_t>& ids) const;

  std::optional<int32_t> IdOf(std::string_view token) const;
  // The vocabulary's spelling of `id`, or null when no token has it.
  const std::string* TokenOf(int32_t id) const;

 private:
  struct Merge {
    int rank = 0;
    int32_t merged_id = 0;
  };
  static uint64_t PairKey(int32_t left, int32_t right) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) |
           static_cast<uint32_t>(right);
  }
  const Merge* FindMerge(int32_t left, int32_t right) const;
  // Applies the merges to `symbols` in place.
  void MergeAll(std::vector<int32_t>& symbols) const;

  // Looks up string_views without copying them into strings.
  struct StringHash {
    using is_transparent = void;
    size_t operator()(std::string_view text) const { return std::hash<std::string_view>{}(text); }
  };

  std::unordered_map<std::string, int32_t, StringHash, std::equal_to<>> id_of_token_;
  std::unordered_map<int32_t, std::string> token_of_id_;
  std::unordered_map<uint64_t, Merge> merges_;
  std::optional<int32_t> byte_ids_[256];  // `<0xNN>` tokens, for byte fallback
  std::optional<int32_t> unknown_id_;
  bool byte_fallback_ = false;
  bool fuse_unknown_ = false;
  bool ignore_merges_ = false;
};

}  // namespace moeserve::engine
