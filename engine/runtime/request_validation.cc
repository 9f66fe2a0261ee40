#include "engine/runtime/request_validation.h"

#include <cmath>

#include "absl/strings/str_cat.h"

namespace moeserve::engine {

absl::Status ValidateGenerationInput(GenerationInput& in, const RequestLimits& limits,
                                     const Tokenizer* tokenizer) {
  const int context = limits.context_length;
  if (in.request_id.size() > static_cast<size_t>(limits.max_request_id_bytes)) {
    return absl::InvalidArgumentError(
        absl::StrCat("request_id is longer than ", limits.max_request_id_bytes, " bytes"));
  }
  if (in.text.has_value()) {
    if (in.text->empty()) return absl::InvalidArgumentError("text is empty: give a prompt");
    if (tokenizer == nullptr) {
      return absl::InvalidArgumentError(
          "this model has no tokenizer: send token_ids instead of text");
    }
    // No tokenizer produces fewer tokens than bytes/8; refuse absurd sizes before tokenizing.
    if (in.text->size() > static_cast<size_t>(context) * 8) {
      return absl::InvalidArgumentError(absl::StrCat("text is ", in.text->size(),
                                                     " bytes, far beyond the context length of ",
                                                     context, " tokens"));
    }
    absl::StatusOr<std::vector<int32_t>> tokens =
        in.add_special_tokens ? tokenizer->Encode(*in.text) : tokenizer->EncodeWithoutBos(*in.text);
    if (!tokens.ok()) return tokens.status();
    in.prompt_tokens.assign(tokens->begin(), tokens->end());
  } else if (in.prompt_tokens.empty()) {
    return absl::InvalidArgumentError(
        "the request has no input: set `text` or a non-empty `token_ids`");
  }
  const int prompt = static_cast<int>(in.prompt_tokens.size());
  for (int i = 0; i < prompt; ++i) {
    if (in.prompt_tokens[i] < 0 || in.prompt_tokens[i] >= limits.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat("token_ids[", i, "] = ", in.prompt_tokens[i],
                                                     " is out of range: the vocabulary has ",
                                                     limits.vocab_size, " tokens"));
    }
  }
  if (prompt >= context) {
    return absl::InvalidArgumentError(absl::StrCat("the prompt has ", prompt,
                                                   " tokens; the context length is ", context,
                                                   " (prompt + max_tokens must fit)"));
  }
  if (in.max_tokens < 1) return absl::InvalidArgumentError("max_tokens must be at least 1");
  if (in.max_tokens > context) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_tokens = ", in.max_tokens, " exceeds the context length of ", context));
  }
  if (prompt + in.max_tokens > context) {
    return absl::InvalidArgumentError(
        absl::StrCat("prompt (", prompt, " tokens) + max_tokens (", in.max_tokens,
                     ") = ", prompt + in.max_tokens, " exceeds the context length of ", context,
                     "; lower max_tokens to at most ", context - prompt));
  }
  const SamplingOptions& s = in.sampling;
  if (!std::isfinite(s.temperature) || s.temperature < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("sampling.temperature must be a finite number >= 0, got ", s.temperature));
  }
  if (!std::isfinite(s.top_p) || s.top_p < 0 || s.top_p > 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("sampling.top_p must be in [0, 1], got ", s.top_p));
  }
  if (s.top_k < 0) return absl::InvalidArgumentError("sampling.top_k must be >= 0");
  if (in.stop.size() > static_cast<size_t>(limits.max_stop_strings)) {
    return absl::InvalidArgumentError(
        absl::StrCat("at most ", limits.max_stop_strings, " stop strings are allowed"));
  }
  for (const std::string& stop : in.stop) {
    if (stop.empty() || stop.size() > static_cast<size_t>(limits.max_stop_string_bytes)) {
      return absl::InvalidArgumentError(
          absl::StrCat("stop strings must be 1 to ", limits.max_stop_string_bytes, " bytes long"));
    }
  }
  if (!in.stop.empty() && tokenizer == nullptr) {
    return absl::InvalidArgumentError("stop strings need a tokenizer; use stop_token_ids");
  }
  for (int64_t id : in.stop_token_ids) {
    if (id < 0 || id >= limits.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat("stop_token_ids has ", id,
                                                     ", out of range: the vocabulary has ",
                                                     limits.vocab_size, " tokens"));
    }
  }
  const int blocks_needed =
      (prompt + in.max_tokens + limits.kv_block_size - 1) / limits.kv_block_size;
  if (blocks_needed > limits.kv_blocks_per_rank) {
    return absl::InvalidArgumentError(absl::StrCat(
        "prompt + max_tokens needs ", blocks_needed, " KV cache blocks but a rank's cache has ",
        limits.kv_blocks_per_rank, "; lower max_tokens or raise --kv-cache-mib"));
  }
  return absl::OkStatus();
}

}  // namespace moeserve::engine
