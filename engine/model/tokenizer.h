// Tokenizer: text ↔ token ids. The built-in models use ByteTokenizer (one token per byte, plus
// <bos> and <eos>), so any text round-trips. Immutable; safe to share between threads.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace moeserve::engine {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  // Token ids of `text`, with the beginning-of-sequence token first when the model uses one.
  // INVALID_ARGUMENT when tokenizing `text` would take more work than the tokenizer allows one
  // text (a pre-tokenizer regex that backtracks without end on it).
  virtual absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text) const = 0;
  // The same without the beginning-of-sequence token.
  virtual absl::StatusOr<std::vector<int32_t>> EncodeWithoutBos(std::string_view text) const = 0;
  // The raw bytes a token stands for (possibly an incomplete UTF-8 sequence); special tokens
  // decode to nothing.
  virtual std::string TokenBytes(int32_t token) const = 0;
};

class ByteTokenizer : public Tokenizer {
 public:
  ByteTokenizer(int32_t bos_token_id, int32_t eos_token_id)
      : bos_token_id_(bos_token_id), eos_token_id_(eos_token_id) {}
  absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text) const override;
  absl::StatusOr<std::vector<int32_t>> EncodeWithoutBos(std::string_view text) const override;
  std::string TokenBytes(int32_t token) const override;

 private:
  int32_t bos_token_id_;
  int32_t eos_token_id_;
};

// Turns a growing byte stream into valid UTF-8 text: complete characters are released, an
// incomplete trailing sequence is held back until its continuation bytes arrive, and bytes
// that can never form a character become U+FFFD. Not thread-safe (one per request).
class Utf8StreamDecoder {
 public:
  // Appends bytes; returns the text that became complete.
  std::string Push(std::string_view bytes);
  // Releases whatever is held back (as U+FFFD) at the end of the stream.
  std::string Flush();
  // The bytes held back, to continue the stream elsewhere (disaggregated serving).
  const std::string& pending() const { return pending_; }
  void set_pending(std::string pending) { pending_ = std::move(pending); }

 private:
  std::string pending_;
};

}  // namespace moeserve::engine
