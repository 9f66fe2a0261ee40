// The OpenAI API's wire format for completions and chat completions, as moeserve reads and
// writes it: request JSON → engine inputs (validated field by field, with messages that name
// the field), and engine outputs → response objects, server-sent-event chunks and errors.
// The HTTP transport is server/openai_http_server.h; this header has no I/O.
//
// Stateless functions; thread-safe.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/api/request.h"
#include "nlohmann/json.hpp"
#include "server/chat_template.h"

namespace moeserve::server {

// What the request parser needs to know of the served model.
struct OpenAiModel {
  std::string name;  // the `model` clients must send (the engine's model name)
  int context_length = 0;
  const ChatTemplate* chat_template = nullptr;  // null: chat completions are refused
  // Why chat templates cannot be rendered on this server (its embedded Python would not start);
  // chat completions then get 503 with this reason. Empty: the model just has no template.
  std::string chat_unavailable;
  int max_choices = 16;  // bound on n × prompts
};

// A parsed request: one engine input per choice, choice i of prompt p at index p * n + i
// (OpenAI's order for batched completions).
struct OpenAiRequest {
  bool chat = false;
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage
  int n = 1;
  std::vector<engine::GenerationInput> choices;
};

// Parses a /v1/completions (chat = false) or /v1/chat/completions body. INVALID_ARGUMENT for a
// malformed or unsupported request, NOT_FOUND for another model's name. `request_id` prefixes
// the engine request ids.
absl::StatusOr<OpenAiRequest> ParseOpenAiRequest(bool chat, std::string_view body,
                                                 const OpenAiModel& model,
                                                 const std::string& request_id);

// OpenAI's finish reasons: "stop" (end of sequence, stop token or string) or "length".
std::string FinishReasonName(engine::FinishReason reason);

// What every response object of one request repeats.
struct OpenAiResponseHeader {
  std::string id;  // cmpl-… or chatcmpl-…
  int64_t created = 0;
  std::string model;
  bool chat = false;
};

struct OpenAiUsage {
  int prompt_tokens = 0;
  int completion_tokens = 0;
};

// One streamed chunk ("data: {...}\n\n"): a piece of choice `index`'s text; `role` only on a
// chat choice's first chunk; `finish_reason` on its last. With include_usage every chunk has
// "usage": null, as OpenAI sends it.
std::string StreamChunkEvent(const OpenAiResponseHeader& header, int index,
                             std::optional<std::string_view> role, std::string_view text,
                             const std::optional<std::string>& finish_reason, bool include_usage);
// The usage chunk that ends a stream with include_usage (no choices).
std::string UsageEvent(const OpenAiResponseHeader& header, const OpenAiUsage& usage);
// An error inside a stream (after the 200 status went out), then the stream ends.
std::string ErrorEvent(const absl::Status& status);
inline constexpr std::string_view kDoneEvent = "data: [DONE]\n\n";

struct OpenAiChoiceResult {
  std::string text;
  std::string finish_reason;
};
// The whole (non-streaming) response object.
std::string CompletionResponse(const OpenAiResponseHeader& header,
                               const std::vector<OpenAiChoiceResult>& choices,
                               const OpenAiUsage& usage);

// The error body {"error": {"message", "type", "param", "code"}} and its HTTP status: 400 for a
// request that cannot be served as written, 404 for an unknown model or path, 429 when the
// queue is full, 503 while loading, shutting down or after a group failure, 500 otherwise.
int HttpStatusFor(const absl::Status& status);
std::string ErrorBody(const absl::Status& status);

// GET /v1/models.
std::string ModelListResponse(const std::string& model, int64_t created);

}  // namespace moeserve::server
