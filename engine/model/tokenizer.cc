#include "engine/model/tokenizer.h"

namespace moeserve::engine {
namespace {

constexpr std::string_view kReplacement = "\xEF\xBF\xBD";

// Length of the UTF-8 sequence that starts with `lead`, or 0 if it cannot start one.
int SequenceLength(unsigned char lead) {
  if (lead < 0x80) return 1;
  if (lead >= 0xC2 && lead <= 0xDF) return 2;
  if (lead >= 0xE0 && lead <= 0xEF) return 3;
  if (lead >= 0xF0 && lead <= 0xF4) return 4;
  return 0;
}

// Whether `byte` may follow the lead byte at position `index` (1-based) of a sequence; checks
// the overlong and surrogate exclusions of the second byte.
bool ValidContinuation(unsigned char lead, int index, unsigned char byte) {
  if ((byte & 0xC0) != 0x80) return false;
  if (index != 1) return true;
  if (lead == 0xE0) return byte >= 0xA0;
  if (lead == 0xED) return byte <= 0x9F;
  if (lead == 0xF0) return byte >= 0x90;
  if (lead == 0xF4) return byte <= 0x8F;
  return true;
}

}  // namespace

absl::StatusOr<std::vector<int32_t>> ByteTokenizer::Encode(std::string_view text) const {
  std::vector<int32_t> ids;
  ids.reserve(text.size() + 1);
  ids.push_back(bos_token_id_);
  for (unsigned char c : text) ids.push_back(c);
  return ids;
}

absl::StatusOr<std::vector<int32_t>> ByteTokenizer::EncodeWithoutBos(std::string_view text) const {
  return std::vector<int32_t>(reinterpret_cast<const unsigned char*>(text.data()),
                              reinterpret_cast<const unsigned char*>(text.data()) + text.size());
}

std::string ByteTokenizer::TokenBytes(int32_t token) const {
  if (token >= 0 && token < 256) return std::string(1, static_cast<char>(token));
  return "";
}

std::string Utf8StreamDecoder::Push(std::string_view bytes) {
  pending_.append(bytes);
  std::string out;
  size_t i = 0;
  while (i < pending_.size()) {
    const auto lead = static_cast<unsigned char>(pending_[i]);
    const int length = SequenceLength(lead);
    if (length == 0) {
      out.append(kReplacement);
      ++i;
      continue;
    }
    int have = 1;
    bool broken = false;
    while (have < length && i + have < pending_.size()) {
      if (!ValidContinuation(lead, have, static_cast<unsigned char>(pending_[i + have]))) {
        broken = true;
        break;
      }
      ++have;
    }
    if (broken) {
      out.append(kReplacement);
      i += have;  // the invalid byte starts the next attempt
      continue;
    }
    if (have < length) break;  // incomplete: wait for more bytes
    out.append(pending_, i, length);
    i += length;
  }
  pending_.erase(0, i);
  return out;
}

std::string Utf8StreamDecoder::Flush() {
  std::string out = pending_.empty() ? "" : std::string(kReplacement);
  pending_.clear();
  return out;
}

}  // namespace moeserve::engine
