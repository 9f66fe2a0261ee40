#include "engine/model/bpe_model.h"

#include <cstdio>
#include <functional>
#include <queue>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "engine/base/status_macros.h"
#include "engine/model/tokenizer_json.h"
#include "nlohmann/json.hpp"

namespace moeserve::engine {

using tokenizer_json::ReadOptional;
using tokenizer_json::Unsupported;

absl::StatusOr<BpeModel> BpeModel::Create(const nlohmann::json& model, int vocab_size) {
  BpeModel out;
  RETURN_IF_ERROR(ReadOptional(model, "byte_fallback", &out.byte_fallback_, "model"));
  RETURN_IF_ERROR(ReadOptional(model, "fuse_unk", &out.fuse_unknown_, "model"));
  RETURN_IF_ERROR(ReadOptional(model, "ignore_merges", &out.ignore_merges_, "model"));
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    auto it = model.find(key);
    if (it != model.end() && it->is_string() && !it->get<std::string>().empty()) {
      return Unsupported(absl::StrCat("BPE `", key, "`"));
    }
  }

  auto vocab = model.find("vocab");
  if (vocab == model.end() || !vocab->is_object()) {
    return absl::InvalidArgumentError("tokenizer: `model.vocab` must be an object");
  }
  for (const auto& [token, id] : vocab->items()) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() >= vocab_size) {
      return absl::InvalidArgumentError(
          absl::StrCat("tokenizer: token `", token, "` has id ", id.dump(),
                       ", outside the model's vocabulary of ", vocab_size));
    }
    out.id_of_token_[token] = id.get<int32_t>();
    out.token_of_id_[id.get<int32_t>()] = token;
  }
  for (int byte = 0; byte < 256; ++byte) {
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", byte);
    out.byte_ids_[byte] = out.IdOf(name);
  }
  // Without its token in the vocabulary the library would fail on the first unknown character;
  // here such characters are dropped, as when no unknown token is named.
  std::string unknown;
  RETURN_IF_ERROR(ReadOptional(model, "unk_token", &unknown, "model"));
  if (!unknown.empty()) out.unknown_id_ = out.IdOf(unknown);

  auto merges = model.find("merges");
  if (merges == model.end() || !merges->is_array()) {
    return absl::InvalidArgumentError("tokenizer: `model.merges` must be an array");
  }
  int rank = 0;
  for (const nlohmann::json& merge : *merges) {
    std::string left, right;
    if (merge.is_string()) {  // "left right"
      const std::string text = merge.get<std::string>();
      const size_t space = text.find(' ', 1);
      if (space == std::string::npos) {
        return absl::InvalidArgumentError(absl::StrCat("tokenizer: malformed merge `", text, "`"));
      }
      left = text.substr(0, space);
      right = text.substr(space + 1);
    } else if (merge.is_array() && merge.size() == 2 && merge[0].is_string() &&
               merge[1].is_string()) {
      left = merge[0].get<std::string>();
      right = merge[1].get<std::string>();
    } else {
      return absl::InvalidArgumentError(absl::StrCat("tokenizer: malformed merge ", merge.dump()));
    }
    const std::optional<int32_t> left_id = out.IdOf(left);
    const std::optional<int32_t> right_id = out.IdOf(right);
    const std::optional<int32_t> merged_id = out.IdOf(left + right);
    if (!left_id || !right_id || !merged_id) {
      const std::string& missing = !left_id ? left : !right_id ? right : left + right;
      return absl::InvalidArgumentError(absl::StrCat("tokenizer: merge `", left, " ", right,
                                                     "` needs `", missing,
                                                     "`, which is not in the vocabulary"));
    }
    // A pair listed twice keeps its last rank, as the library's map does.
    out.merges_[PairKey(*left_id, *right_id)] = {rank++, *merged_id};
  }
  return out;
}

std::optional<int32_t> BpeModel::IdOf(std::string_view token) const {
  auto it = id_of_token_.find(token);
  if (it == id_of_token_.end()) return std::nullopt;
  return it->second;
}

const std::string* BpeModel::TokenOf(int32_t id) const {
  auto it = token_of_id_.find(id);
  return it == token_of_id_.end() ? nullptr : &it->second;
}

const BpeModel::Merge* BpeModel::FindMerge(int32_t left, int32_t right) const {
  auto it = merges_.find(PairKey(left, right));
  return it == merges_.end() ? nullptr : &it->second;
}

void BpeModel::EncodeWord(std::string_view word, std::vector<int32_t>& ids) const {
  if (word.empty()) return;
  if (ignore_merges_) {
    if (std::optional<int32_t> id = IdOf(word)) {
      ids.push_back(*id);
      return;
    }
  }
  std::vector<int32_t> symbols;
  symbols.reserve(word.size());
  // An unknown token not yet placed: a run of unknown characters becomes one with fuse_unk.
  std::optional<int32_t> pending_unknown;
  for (size_t i = 0; i < word.size();) {
    const size_t length = tokenizer_json::CharacterLength(word, i);
    const std::string_view character = word.substr(i, length);
    i += length;
    if (std::optional<int32_t> id = IdOf(character)) {
      if (pending_unknown) symbols.push_back(*std::exchange(pending_unknown, std::nullopt));
      symbols.push_back(*id);
      continue;
    }
    if (byte_fallback_) {
      bool every_byte_has_a_token = true;
      for (unsigned char byte : character) every_byte_has_a_token &= byte_ids_[byte].has_value();
      if (every_byte_has_a_token) {
        // The library leaves a pending unknown token pending here, so it lands after these
        // bytes; kept, because the ids must be the library's.
        for (unsigned char byte : character) symbols.push_back(*byte_ids_[byte]);
        continue;
      }
    }
    if (!unknown_id_) continue;  // dropped
    if (pending_unknown && fuse_unknown_) continue;
    if (pending_unknown) symbols.push_back(*pending_unknown);
    pending_unknown = unknown_id_;
  }
  if (pending_unknown) symbols.push_back(*pending_unknown);
  MergeAll(symbols);
  ids.insert(ids.end(), symbols.begin(), symbols.end());
}

void BpeModel::MergeAll(std::vector<int32_t>& symbols) const {
  if (symbols.size() < 2 || merges_.empty()) return;
  const int count = static_cast<int>(symbols.size());
  // A doubly linked list over the symbols; a merged-away symbol is marked removed.
  std::vector<int> previous(count), next(count);
  std::vector<bool> removed(count, false);
  for (int i = 0; i < count; ++i) {
    previous[i] = i - 1;
    next[i] = i + 1 < count ? i + 1 : -1;
  }
  struct Candidate {
    int rank;
    int position;  // of the pair's left symbol
    int32_t merged_id;
    // Lowest rank first, then leftmost.
    bool operator>(const Candidate& other) const {
      return rank != other.rank ? rank > other.rank : position > other.position;
    }
  };
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> queue;
  for (int i = 0; i + 1 < count; ++i) {
    if (const Merge* merge = FindMerge(symbols[i], symbols[i + 1])) {
      queue.push({merge->rank, i, merge->merged_id});
    }
  }
  while (!queue.empty()) {
    const Candidate top = queue.top();
    queue.pop();
    const int left = top.position;
    if (removed[left] || next[left] == -1) continue;
    const int right = next[left];
    // Skip entries made stale by an earlier merge of either symbol.
    const Merge* current = FindMerge(symbols[left], symbols[right]);
    if (current == nullptr || current->merged_id != top.merged_id) continue;
    symbols[left] = top.merged_id;
    removed[right] = true;
    next[left] = next[right];
    if (next[left] != -1) previous[next[left]] = left;
    if (previous[left] != -1) {
      if (const Merge* merge = FindMerge(symbols[previous[left]], symbols[left])) {
        queue.push({merge->rank, previous[left], merge->merged_id});
      }
    }
    if (next[left] != -1) {
      if (const Merge* merge = FindMerge(symbols[left], symbols[next[left]])) {
        queue.push({merge->rank, left, merge->merged_id});
      }
    }
  }
  int kept = 0;
  for (int i = 0; i < count; ++i) {
    if (!removed[i]) symbols[kept++] = symbols[i];
  }
  symbols.resize(kept);
}

}  // namespace moeserve::engine
