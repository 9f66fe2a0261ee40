#include "server/openai_protocol.h"

#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"

namespace moeserve::server {
namespace {

// Ordered: messages and tools reach the chat template with their keys in the client's order.
using json = nlohmann::ordered_json;

absl::Status Invalid(absl::string_view message) { return absl::InvalidArgumentError(message); }

// object[key] when it is a string, else "" (json::value would throw on another type).
std::string StringField(const json& object, const char* key) {
  auto it = object.find(key);
  return it != object.end() && it->is_string() ? it->get<std::string>() : std::string();
}

// Fields clients routinely send with their neutral values; anything else in them changes what
// a generation means, and moeserve does not do it yet.
absl::Status CheckUnsupported(const json& body, bool chat) {
  for (const char* penalty : {"frequency_penalty", "presence_penalty"}) {
    if (auto it = body.find(penalty); it != body.end() && !it->is_null()) {
      if (!it->is_number()) return Invalid(absl::StrCat("`", penalty, "` must be a number"));
      if (it->get<double>() != 0) {
        return Invalid(absl::StrCat("`", penalty, "` is not supported (only 0)"));
      }
    }
  }
  if (auto it = body.find("logit_bias"); it != body.end() && !it->is_null() && !it->empty()) {
    return Invalid("`logit_bias` is not supported");
  }
  if (auto it = body.find("logprobs"); it != body.end() && !it->is_null()) {
    if (chat ? (it->is_boolean() && it->get<bool>()) : true) {
      return Invalid("`logprobs` are not supported yet; leave the field out");
    }
  }
  if (auto it = body.find("top_logprobs"); it != body.end() && !it->is_null()) {
    return Invalid("`top_logprobs` is not supported yet; leave the field out");
  }
  if (auto it = body.find("echo"); it != body.end() && it->is_boolean() && it->get<bool>()) {
    return Invalid("`echo` is not supported");
  }
  if (auto it = body.find("suffix"); it != body.end() && !it->is_null()) {
    return Invalid("`suffix` is not supported");
  }
  if (auto it = body.find("best_of"); it != body.end() && !it->is_null()) {
    auto n = body.find("n");
    const int64_t choices = n != body.end() && n->is_number_integer() ? n->get<int64_t>() : 1;
    if (!it->is_number_integer() || it->get<int64_t>() != choices) {
      return Invalid("`best_of` is not supported (only equal to n)");
    }
  }
  if (auto it = body.find("response_format"); it != body.end() && !it->is_null()) {
    if (!it->is_object() || StringField(*it, "type") != "text") {
      return Invalid("`response_format` other than {\"type\": \"text\"} is not supported");
    }
  }
  return absl::OkStatus();
}

// Reads an optional number field; `*present` tells whether it was there and not null.
absl::Status ReadNumber(const json& body, const char* name, double* value, bool* present) {
  *present = false;
  auto it = body.find(name);
  if (it == body.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_number()) return Invalid(absl::StrCat("`", name, "` must be a number"));
  *value = it->get<double>();
  if (!std::isfinite(*value)) return Invalid(absl::StrCat("`", name, "` must be finite"));
  *present = true;
  return absl::OkStatus();
}

absl::Status ReadInteger(const json& body, const char* name, int64_t* value, bool* present) {
  *present = false;
  auto it = body.find(name);
  if (it == body.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_number_integer()) return Invalid(absl::StrCat("`", name, "` must be an integer"));
  *value =
      it->is_number_unsigned() && it->get<uint64_t>() > INT64_MAX ? INT64_MAX : it->get<int64_t>();
  *present = true;
  return absl::OkStatus();
}

absl::Status ReadBool(const json& body, const char* name, bool* value) {
  auto it = body.find(name);
  if (it == body.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_boolean()) return Invalid(absl::StrCat("`", name, "` must be true or false"));
  *value = it->get<bool>();
  return absl::OkStatus();
}

// Token ids of a prompt given as numbers, as sent: the engine checks them against the
// vocabulary and reports the id. (An unsigned id beyond int64 is kept as INT64_MAX, still out of
// range.)
absl::StatusOr<std::vector<int64_t>> TokenIds(const json& array, const char* where) {
  std::vector<int64_t> ids;
  ids.reserve(array.size());
  for (const json& id : array) {
    if (!id.is_number_integer()) {
      return Invalid(absl::StrCat(where, " must hold only integers (token ids) or be a string"));
    }
    ids.push_back(id.is_number_unsigned() && id.get<uint64_t>() > INT64_MAX ? INT64_MAX
                                                                            : id.get<int64_t>());
  }
  return ids;
}

// The prompts of a completion request: a string, a list of strings, a list of token ids, or a
// list of such lists.
absl::StatusOr<std::vector<engine::GenerationInput>> CompletionPrompts(const json& body) {
  auto it = body.find("prompt");
  if (it == body.end() || it->is_null()) return Invalid("`prompt` is required");
  std::vector<engine::GenerationInput> prompts;
  auto add_text = [&](const json& text) {
    engine::GenerationInput input;
    input.text = text.get<std::string>();
    prompts.push_back(std::move(input));
  };
  if (it->is_string()) {
    add_text(*it);
  } else if (it->is_array() && !it->empty() && (*it)[0].is_number_integer()) {
    absl::StatusOr<std::vector<int64_t>> ids = TokenIds(*it, "`prompt`");
    if (!ids.ok()) return ids.status();
    engine::GenerationInput input;
    input.prompt_tokens = std::move(*ids);
    prompts.push_back(std::move(input));
  } else if (it->is_array() && !it->empty()) {
    for (const json& item : *it) {
      if (item.is_string()) {
        add_text(item);
      } else if (item.is_array() && !item.empty()) {
        absl::StatusOr<std::vector<int64_t>> ids = TokenIds(item, "each `prompt` list");
        if (!ids.ok()) return ids.status();
        engine::GenerationInput input;
        input.prompt_tokens = std::move(*ids);
        prompts.push_back(std::move(input));
      } else {
        return Invalid("`prompt` must be a string, a list of strings, or (lists of) token ids");
      }
    }
  } else {
    return Invalid("`prompt` must be a non-empty string, list of strings, or list of token ids");
  }
  return prompts;
}

// Message content as templates expect it: a string (or null). OpenAI's list of content parts
// is joined when every part is text.
absl::StatusOr<json> MessageContent(const json& content, size_t index) {
  if (content.is_string() || content.is_null()) return content;
  if (content.is_array()) {
    std::string text;
    for (const json& part : content) {
      if (!part.is_object() || StringField(part, "type") != "text" || !part.contains("text") ||
          !part["text"].is_string()) {
        return Invalid(
            absl::StrCat("messages[", index, "].content: only text content parts are supported"));
      }
      if (!text.empty()) text += "\n";
      text += part["text"].get<std::string>();
    }
    return json(text);
  }
  return Invalid(absl::StrCat("messages[", index, "].content must be a string or a list of parts"));
}

absl::StatusOr<engine::GenerationInput> ChatPrompt(const json& body, const OpenAiModel& model) {
  auto it = body.find("messages");
  if (it == body.end() || !it->is_array() || it->empty()) {
    return Invalid("`messages` must be a non-empty list of {\"role\", \"content\"} objects");
  }
  if (model.chat_template == nullptr && !model.chat_unavailable.empty()) {
    return absl::UnavailableError(model.chat_unavailable);
  }
  if (model.chat_template == nullptr) {
    return absl::InvalidArgumentError(
        "this model has no chat template (tokenizer_config.json has no chat_template): start "
        "the server with --chat-template FILE, or use /v1/completions");
  }
  json messages = json::array();
  for (size_t i = 0; i < it->size(); ++i) {
    const json& message = (*it)[i];
    if (!message.is_object() || !message.contains("role") || !message["role"].is_string()) {
      return Invalid(absl::StrCat("messages[", i, "] must be an object with a string `role`"));
    }
    json copy = message;
    if (auto content = message.find("content"); content != message.end()) {
      absl::StatusOr<json> normalized = MessageContent(*content, i);
      if (!normalized.ok()) return normalized.status();
      copy["content"] = std::move(*normalized);
    } else {
      copy["content"] = nullptr;
    }
    messages.push_back(std::move(copy));
  }
  bool add_generation_prompt = true;
  if (auto status = ReadBool(body, "add_generation_prompt", &add_generation_prompt); !status.ok()) {
    return status;
  }
  bool continue_final_message = false;
  if (auto status = ReadBool(body, "continue_final_message", &continue_final_message);
      !status.ok()) {
    return status;
  }
  if (continue_final_message) return Invalid("`continue_final_message` is not supported");
  json tools = body.value("tools", json());
  json variables = body.value("chat_template_kwargs", json::object());
  if (!variables.is_object()) return Invalid("`chat_template_kwargs` must be an object");
  absl::StatusOr<std::string> prompt =
      model.chat_template->Render(messages, add_generation_prompt, tools, variables);
  if (!prompt.ok()) return prompt.status();
  if (prompt->empty()) return Invalid("the chat template rendered these messages as empty text");
  engine::GenerationInput input;
  input.text = std::move(*prompt);
  input.add_special_tokens = model.chat_template->source().add_special_tokens;
  return input;
}

absl::Status ReadStops(const json& body, std::vector<std::string>* stop) {
  auto it = body.find("stop");
  if (it == body.end() || it->is_null()) return absl::OkStatus();
  if (it->is_string()) {
    stop->push_back(it->get<std::string>());
    return absl::OkStatus();
  }
  if (it->is_array()) {
    for (const json& item : *it) {
      if (!item.is_string()) return Invalid("`stop` must be a string or a list of strings");
      stop->push_back(item.get<std::string>());
    }
    return absl::OkStatus();
  }
  return Invalid("`stop` must be a string or a list of strings");
}

json UsageJson(const OpenAiUsage& usage) {
  return {{"prompt_tokens", usage.prompt_tokens},
          {"completion_tokens", usage.completion_tokens},
          {"total_tokens", usage.prompt_tokens + usage.completion_tokens}};
}

json HeaderJson(const OpenAiResponseHeader& header, bool chunk) {
  return {{"id", header.id},
          {"object",
           header.chat ? (chunk ? "chat.completion.chunk" : "chat.completion") : "text_completion"},
          {"created", header.created},
          {"model", header.model}};
}

std::string Dump(const json& value) {
  // Engine text is valid UTF-8; replace guards against anything else rather than throwing.
  return value.dump(-1, ' ', false, json::error_handler_t::replace);
}

}  // namespace

absl::StatusOr<OpenAiRequest> ParseOpenAiRequest(bool chat, std::string_view body_text,
                                                 const OpenAiModel& model,
                                                 const std::string& request_id) {
  json body = json::parse(body_text, nullptr, /*allow_exceptions=*/false);
  if (body.is_discarded()) return Invalid("the request body is not valid JSON");
  if (!body.is_object()) return Invalid("the request body must be a JSON object");
  if (auto it = body.find("model"); it != body.end() && !it->is_null()) {
    if (!it->is_string()) return Invalid("`model` must be a string");
    if (it->get<std::string>() != model.name) {
      return absl::NotFoundError(absl::StrCat("the model `", it->get<std::string>(),
                                              "` does not exist; this server serves `", model.name,
                                              "`"));
    }
  }
  if (auto status = CheckUnsupported(body, chat); !status.ok()) return status;

  OpenAiRequest request;
  request.chat = chat;
  if (auto status = ReadBool(body, "stream", &request.stream); !status.ok()) return status;
  if (auto it = body.find("stream_options"); it != body.end() && !it->is_null()) {
    if (!request.stream) return Invalid("`stream_options` is allowed only with `stream: true`");
    if (!it->is_object()) return Invalid("`stream_options` must be an object");
    if (auto status = ReadBool(*it, "include_usage", &request.include_usage); !status.ok()) {
      return status;
    }
  }
  int64_t n = 1;
  bool present = false;
  if (auto status = ReadInteger(body, "n", &n, &present); !status.ok()) return status;
  if (n < 1) return Invalid("`n` must be at least 1");

  // The sampling fields every choice shares.
  engine::GenerationInput shared;
  double number = 0;
  shared.sampling.temperature = 1.0f;  // OpenAI's default
  if (auto status = ReadNumber(body, "temperature", &number, &present); !status.ok()) {
    return status;
  }
  if (present) {
    if (number < 0 || number > 2) return Invalid("`temperature` must be between 0 and 2");
    shared.sampling.temperature = static_cast<float>(number);
  }
  if (auto status = ReadNumber(body, "top_p", &number, &present); !status.ok()) return status;
  if (present) {
    if (number <= 0 || number > 1) return Invalid("`top_p` must be in (0, 1]");
    shared.sampling.top_p = static_cast<float>(number);
  }
  int64_t integer = 0;
  if (auto status = ReadInteger(body, "top_k", &integer, &present); !status.ok()) return status;
  if (present) {
    if (integer < -1 || integer > INT32_MAX) return Invalid("`top_k` must be -1, 0 (off) or more");
    shared.sampling.top_k = integer <= 0 ? 0 : static_cast<int>(integer);
  }
  std::optional<uint64_t> seed;
  if (auto status = ReadInteger(body, "seed", &integer, &present); !status.ok()) return status;
  if (present) seed = static_cast<uint64_t>(integer);
  // max_completion_tokens is the newer name; either is accepted, the newer one wins.
  int64_t max_tokens = 0;
  bool has_max_tokens = false;
  for (const char* name : {"max_tokens", "max_completion_tokens"}) {
    if (auto status = ReadInteger(body, name, &integer, &present); !status.ok()) return status;
    if (present) {
      if (integer < 1) return Invalid(absl::StrCat("`", name, "` must be at least 1"));
      max_tokens = integer;
      has_max_tokens = true;
    }
  }
  if (auto status = ReadStops(body, &shared.stop); !status.ok()) return status;
  if (auto status = ReadBool(body, "ignore_eos", &shared.ignore_eos); !status.ok()) return status;

  std::vector<engine::GenerationInput> prompts;
  if (chat) {
    absl::StatusOr<engine::GenerationInput> prompt = ChatPrompt(body, model);
    if (!prompt.ok()) return prompt.status();
    prompts.push_back(std::move(*prompt));
  } else {
    absl::StatusOr<std::vector<engine::GenerationInput>> parsed = CompletionPrompts(body);
    if (!parsed.ok()) return parsed.status();
    prompts = std::move(*parsed);
  }
  if (n * static_cast<int64_t>(prompts.size()) > model.max_choices) {
    return Invalid(absl::StrCat("n × prompts = ", n * static_cast<int64_t>(prompts.size()),
                                " choices; at most ", model.max_choices, " per request"));
  }
  request.n = static_cast<int>(n);
  for (size_t p = 0; p < prompts.size(); ++p) {
    engine::GenerationInput& prompt = prompts[p];
    int64_t choice_max_tokens = max_tokens;
    if (!has_max_tokens) {
      if (!chat) {
        choice_max_tokens = 16;  // OpenAI's default for completions
      } else {
        // Chat generates up to the context by default. The prompt is not tokenized yet; a
        // byte-level tokenizer never makes more tokens than bytes (+ the beginning token), so
        // this bound always fits.
        const int64_t prompt_bound = prompt.text.has_value()
                                         ? static_cast<int64_t>(prompt.text->size()) + 1
                                         : static_cast<int64_t>(prompt.prompt_tokens.size());
        choice_max_tokens = std::max<int64_t>(1, model.context_length - prompt_bound);
      }
    }
    for (int i = 0; i < request.n; ++i) {
      engine::GenerationInput input = prompt;
      input.request_id = absl::StrCat(request_id, "-", p * request.n + i);
      input.sampling = shared.sampling;
      // Choices of one request differ, yet a seeded request repeats exactly.
      if (seed.has_value()) input.sampling.seed = *seed + static_cast<uint64_t>(i);
      input.max_tokens = static_cast<int>(std::min<int64_t>(choice_max_tokens, INT32_MAX));
      input.stop = shared.stop;
      input.ignore_eos = shared.ignore_eos;
      request.choices.push_back(std::move(input));
    }
  }
  return request;
}

std::string FinishReasonName(engine::FinishReason reason) {
  return reason == engine::FinishReason::kStop ? "stop" : "length";
}

std::string StreamChunkEvent(const OpenAiResponseHeader& header, int index,
                             std::optional<std::string_view> role, std::string_view text,
                             const std::optional<std::string>& finish_reason, bool include_usage) {
  json choice = {{"index", index}};
  if (header.chat) {
    json delta = json::object();
    if (role.has_value()) delta["role"] = *role;
    delta["content"] = text;  // also when empty: one chunk per engine message
    choice["delta"] = std::move(delta);
  } else {
    choice["text"] = text;
  }
  choice["logprobs"] = nullptr;
  choice["finish_reason"] = finish_reason.has_value() ? json(*finish_reason) : json();
  json chunk = HeaderJson(header, /*chunk=*/true);
  chunk["choices"] = json::array({std::move(choice)});
  if (include_usage) chunk["usage"] = nullptr;
  return absl::StrCat("data: ", Dump(chunk), "\n\n");
}

std::string UsageEvent(const OpenAiResponseHeader& header, const OpenAiUsage& usage) {
  json chunk = HeaderJson(header, /*chunk=*/true);
  chunk["choices"] = json::array();
  chunk["usage"] = UsageJson(usage);
  return absl::StrCat("data: ", Dump(chunk), "\n\n");
}

std::string ErrorEvent(const absl::Status& status) {
  return absl::StrCat("data: ", ErrorBody(status), "\n\n");
}

std::string CompletionResponse(const OpenAiResponseHeader& header,
                               const std::vector<OpenAiChoiceResult>& choices,
                               const OpenAiUsage& usage) {
  json response = HeaderJson(header, /*chunk=*/false);
  json list = json::array();
  for (size_t i = 0; i < choices.size(); ++i) {
    json choice = {{"index", i}};
    if (header.chat) {
      choice["message"] = {{"role", "assistant"}, {"content", choices[i].text}};
    } else {
      choice["text"] = choices[i].text;
    }
    choice["logprobs"] = nullptr;
    choice["finish_reason"] = choices[i].finish_reason;
    list.push_back(std::move(choice));
  }
  response["choices"] = std::move(list);
  response["usage"] = UsageJson(usage);
  return Dump(response);
}

int HttpStatusFor(const absl::Status& status) {
  switch (status.code()) {
    case absl::StatusCode::kOk:
      return 200;
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kFailedPrecondition:
    case absl::StatusCode::kOutOfRange:
      return 400;
    case absl::StatusCode::kNotFound:
      return 404;
    case absl::StatusCode::kResourceExhausted:
      return 429;
    case absl::StatusCode::kUnavailable:
    case absl::StatusCode::kAborted:
      return 503;
    case absl::StatusCode::kDeadlineExceeded:
      return 504;
    default:
      return 500;
  }
}

std::string ErrorBody(const absl::Status& status) {
  const int http = HttpStatusFor(status);
  std::string type = "server_error";
  json code = nullptr;
  if (http == 400) type = "invalid_request_error";
  if (http == 404) {
    type = "invalid_request_error";
    code = "model_not_found";
  }
  if (http == 429) type = "rate_limit_error";
  if (http == 503) type = "service_unavailable_error";
  json body = {{"error",
                {{"message", std::string(status.message())},
                 {"type", type},
                 {"param", nullptr},
                 {"code", code}}}};
  return Dump(body);
}

std::string ModelListResponse(const std::string& model, int64_t created) {
  json body = {{"object", "list"},
               {"data", json::array({{{"id", model},
                                      {"object", "model"},
                                      {"created", created},
                                      {"owned_by", "moeserve"}}})}};
  return Dump(body);
}

}  // namespace moeserve::server
