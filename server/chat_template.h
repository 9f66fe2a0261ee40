// ChatTemplate: turns an OpenAI-style list of chat messages into the prompt text a model was
// trained on, by rendering the model's Jinja chat template exactly as Hugging Face transformers'
// `apply_chat_template` does: Jinja2's own engine (Debian's python3-jinja2, run in an embedded
// CPython), a sandboxed environment with trim_blocks and lstrip_blocks, the loop-controls
// extension, a `{% generation %}` block that renders its body, `raise_exception`,
// `strftime_now`, a `tojson` filter that keeps non-ASCII text, and the tokenizer's special
// tokens (bos_token, eos_token, ...) as variables.
//
// Where the template comes from (LoadChatTemplateSource): --chat-template FILE, else the
// `chat_template` of the model folder's tokenizer_config.json (or chat_template.jinja next to
// it), else, for the built-in models only, moeserve's plain role-tagged template.
//
// Rendering takes Python's global interpreter lock, so renders run one at a time; a render is
// tens of microseconds and happens once per request, before its prompt is queued. Compile once
// at start-up; Render is thread-safe.
#pragma once

#include <memory>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace moeserve::server {

struct ChatTemplateSource {
  std::string text;    // the Jinja source
  std::string origin;  // where it came from, for logs and error messages
  // Variables every render sees: bos_token, eos_token, unk_token, pad_token, ... (strings) and
  // additional_special_tokens (a list), as the tokenizer config names them.
  nlohmann::ordered_json special_tokens = nlohmann::ordered_json::object();
  // Whether tokenizing the rendering should add the beginning-of-sequence token. False for a
  // model's own template (it writes its special tokens itself, and transformers tokenizes the
  // rendering without adding any); true for the built-in template.
  bool add_special_tokens = false;
};

// The template for `model` (builtin:NAME or a checkpoint folder): `override_file` when not
// empty, else the folder's, else the built-in default for built-in models. nullopt: the model
// has none (chat requests are then refused with a message naming --chat-template).
// INVALID_ARGUMENT / NOT_FOUND for an unreadable or malformed file.
absl::StatusOr<std::optional<ChatTemplateSource>> LoadChatTemplateSource(
    const std::string& model, const std::string& override_file);

class ChatTemplate {
 public:
  // Starts the embedded interpreter on first use and compiles `source` (INVALID_ARGUMENT with
  // Jinja's message for a template that does not parse; FAILED_PRECONDITION when Python or its
  // jinja2 package is missing).
  static absl::StatusOr<std::unique_ptr<ChatTemplate>> Compile(ChatTemplateSource source);
  ~ChatTemplate();

  // Renders `messages` (a JSON array of message objects) with `add_generation_prompt`, the
  // request's `tools` (null when absent) and extra template variables (`variables`, an object,
  // e.g. {"enable_thinking": false}; they override the special tokens, as in transformers).
  // INVALID_ARGUMENT with the template's message when it rejects the conversation
  // (raise_exception) or fails on it.
  // JSON objects keep the order their keys came in: templates that print them (tojson) must
  // print them as the client wrote them, as Python's dicts do.
  absl::StatusOr<std::string> Render(const nlohmann::ordered_json& messages,
                                     bool add_generation_prompt,
                                     const nlohmann::ordered_json& tools,
                                     const nlohmann::ordered_json& variables) const;

  const ChatTemplateSource& source() const { return source_; }

 private:
  ChatTemplate(ChatTemplateSource source, void* compiled);
  ChatTemplateSource source_;
  void* compiled_;  // PyObject*: the compiled jinja2.Template (owned; the interpreter never ends)
};

}  // namespace moeserve::server
