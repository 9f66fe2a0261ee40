#include "server/chat_template.h"

// CPython's header must come before the standard headers.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <filesystem>
#include <fstream>
#include <mutex>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace moeserve::server {
namespace {

// The rendering side, in Python so that Jinja2 itself evaluates the template: the environment
// mirrors the one transformers builds for apply_chat_template (see the header).
constexpr char kRendererSource[] = R"PY(
import datetime
import json

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment


class _GenerationBlock(jinja2.ext.Extension):
    # `{% generation %}...{% endgeneration %}` marks assistant text for training masks; a
    # rendering keeps the body as it is.
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        call = self.call_method("_body")
        return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.datetime.now().strftime(format)


_environment = ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True,
    extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
_environment.filters["tojson"] = _tojson
_environment.globals["raise_exception"] = _raise_exception
_environment.globals["strftime_now"] = _strftime_now


def compile_template(source):
    return _environment.from_string(source)


def render(template, context_json):
    return template.render(**json.loads(context_json))
)PY";

// The interpreter, started once per process and never finalized (threads may still hold
// compiled templates at exit). Its functions are called with the GIL held.
struct Interpreter {
  absl::Status status;
  PyObject* compile_template = nullptr;
  PyObject* render = nullptr;
};

// The current Python exception as "Type: message", clearing it.
std::string TakePythonError() {
  PyObject *type = nullptr, *value = nullptr, *traceback = nullptr;
  PyErr_Fetch(&type, &value, &traceback);
  PyErr_NormalizeException(&type, &value, &traceback);
  std::string text = "unknown Python error";
  if (value != nullptr) {
    if (PyObject* str = PyObject_Str(value); str != nullptr) {
      const char* utf8 = PyUnicode_AsUTF8(str);
      text = utf8 != nullptr ? utf8 : text;
      Py_DECREF(str);
    }
  }
  if (type != nullptr) {
    const char* name = reinterpret_cast<PyTypeObject*>(type)->tp_name;
    // raise_exception's TemplateError carries the template author's message as it is.
    if (std::string(name) != "TemplateError" && name != nullptr) {
      text = absl::StrCat(name, ": ", text);
    }
  }
  PyErr_Clear();
  Py_XDECREF(type);
  Py_XDECREF(value);
  Py_XDECREF(traceback);
  return text;
}

Interpreter& StartInterpreter() {
  static Interpreter* interpreter = [] {
    auto* result = new Interpreter;
    PyConfig config;
    // Isolated: PYTHONPATH, PYTHONHOME and the user's site-packages do not change what this
    // server imports; the system's dist-packages (python3-jinja2) stay on the path. Python
    // installs no signal handlers: `moeserve serve` waits for SIGTERM/SIGINT itself.
    PyConfig_InitIsolatedConfig(&config);
    config.install_signal_handlers = 0;
    PyStatus started = Py_InitializeFromConfig(&config);
    PyConfig_Clear(&config);
    if (PyStatus_Exception(started)) {
      result->status = absl::FailedPreconditionError(
          absl::StrCat("cannot start the embedded Python for chat templates: ",
                       started.err_msg != nullptr ? started.err_msg : "unknown error"));
      return result;
    }
    PyObject* module = PyModule_New("moeserve_chat_template");
    PyObject* globals = PyModule_GetDict(module);
    PyDict_SetItemString(globals, "__builtins__", PyEval_GetBuiltins());
    PyObject* ran = PyRun_String(kRendererSource, Py_file_input, globals, globals);
    if (ran == nullptr) {
      result->status = absl::FailedPreconditionError(
          absl::StrCat("chat templates need Python's jinja2 package (Debian: python3-jinja2): ",
                       TakePythonError()));
    } else {
      Py_DECREF(ran);
      result->compile_template = PyDict_GetItemString(globals, "compile_template");
      result->render = PyDict_GetItemString(globals, "render");
      Py_XINCREF(result->compile_template);
      Py_XINCREF(result->render);
    }
    // The module stays alive (its functions reference it); release the GIL for other threads.
    PyEval_SaveThread();
    return result;
  }();
  return *interpreter;
}

// RAII holder of the GIL for the calling thread.
class GilLock {
 public:
  GilLock() : state_(PyGILState_Ensure()) {}
  ~GilLock() { PyGILState_Release(state_); }
  GilLock(const GilLock&) = delete;
  GilLock& operator=(const GilLock&) = delete;

 private:
  PyGILState_STATE state_;
};

absl::StatusOr<std::string> ReadFile(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", path.string()));
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

// A special token in tokenizer_config.json: a string, or an object with "content".
std::optional<std::string> TokenText(const nlohmann::ordered_json& value) {
  if (value.is_string()) return value.get<std::string>();
  if (value.is_object() && value.contains("content") && value["content"].is_string()) {
    return value["content"].get<std::string>();
  }
  return std::nullopt;
}

nlohmann::ordered_json SpecialTokens(const nlohmann::ordered_json& config) {
  nlohmann::ordered_json tokens = nlohmann::ordered_json::object();
  for (const char* name : {"bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                           "cls_token", "mask_token"}) {
    if (auto it = config.find(name); it != config.end()) {
      if (auto text = TokenText(*it)) tokens[name] = *text;
    }
  }
  if (auto it = config.find("additional_special_tokens"); it != config.end() && it->is_array()) {
    nlohmann::ordered_json list = nlohmann::ordered_json::array();
    for (const nlohmann::ordered_json& token : *it) {
      if (auto text = TokenText(token)) list.push_back(*text);
    }
    tokens["additional_special_tokens"] = list;
  }
  return tokens;
}

// tokenizer_config.json's chat_template: a string, or a list of {"name", "template"} of which
// "default" is the one apply_chat_template uses.
std::optional<std::string> ConfigTemplate(const nlohmann::ordered_json& config) {
  auto it = config.find("chat_template");
  if (it == config.end()) return std::nullopt;
  if (it->is_string()) return it->get<std::string>();
  if (it->is_array()) {
    for (const nlohmann::ordered_json& entry : *it) {
      if (entry.is_object() && entry.contains("name") && entry["name"] == "default" &&
          entry.contains("template") && entry["template"].is_string()) {
        return entry["template"].get<std::string>();
      }
    }
  }
  return std::nullopt;
}

// For the built-in models: one line naming the role, then the content, per message. Their
// byte-level tokenizer has no text form for <bos>, so the tokenizer adds it.
constexpr char kBuiltinTemplate[] =
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}";

}  // namespace

absl::StatusOr<std::optional<ChatTemplateSource>> LoadChatTemplateSource(
    const std::string& model, const std::string& override_file) {
  ChatTemplateSource source;
  const bool builtin = absl::StartsWith(model, "builtin:");
  if (!builtin) {
    const std::filesystem::path folder(model);
    const std::filesystem::path config_path = folder / "tokenizer_config.json";
    if (std::filesystem::exists(config_path)) {
      absl::StatusOr<std::string> text = ReadFile(config_path);
      if (!text.ok()) return text.status();
      nlohmann::ordered_json config =
          nlohmann::ordered_json::parse(*text, nullptr, /*allow_exceptions=*/false);
      if (config.is_discarded() || !config.is_object()) {
        return absl::InvalidArgumentError(
            absl::StrCat(config_path.string(), " is not a JSON object"));
      }
      source.special_tokens = SpecialTokens(config);
      if (auto config_template = ConfigTemplate(config)) {
        source.text = *config_template;
        source.origin = config_path.string();
      }
    }
    // Newer checkpoints keep the template in its own file.
    const std::filesystem::path jinja_path = folder / "chat_template.jinja";
    if (source.text.empty() && std::filesystem::exists(jinja_path)) {
      absl::StatusOr<std::string> text = ReadFile(jinja_path);
      if (!text.ok()) return text.status();
      source.text = *text;
      source.origin = jinja_path.string();
    }
  } else {
    source.add_special_tokens = true;
    source.special_tokens = {{"bos_token", ""}, {"eos_token", ""}};
    source.text = kBuiltinTemplate;
    source.origin = "moeserve's template for built-in models";
  }
  if (!override_file.empty()) {
    absl::StatusOr<std::string> text = ReadFile(override_file);
    if (!text.ok()) return text.status();
    source.text = *text;
    source.origin = override_file;
  }
  if (source.text.empty()) return std::nullopt;
  return source;
}

ChatTemplate::ChatTemplate(ChatTemplateSource source, void* compiled)
    : source_(std::move(source)), compiled_(compiled) {}

ChatTemplate::~ChatTemplate() {
  GilLock gil;
  Py_XDECREF(static_cast<PyObject*>(compiled_));
}

absl::StatusOr<std::unique_ptr<ChatTemplate>> ChatTemplate::Compile(ChatTemplateSource source) {
  Interpreter& interpreter = StartInterpreter();
  if (!interpreter.status.ok()) return interpreter.status;
  GilLock gil;
  PyObject* compiled = PyObject_CallFunction(interpreter.compile_template, "s#", source.text.data(),
                                             static_cast<Py_ssize_t>(source.text.size()));
  if (compiled == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("the chat template from ", source.origin,
                                                   " does not parse: ", TakePythonError()));
  }
  return std::unique_ptr<ChatTemplate>(new ChatTemplate(std::move(source), compiled));
}

absl::StatusOr<std::string> ChatTemplate::Render(const nlohmann::ordered_json& messages,
                                                 bool add_generation_prompt,
                                                 const nlohmann::ordered_json& tools,
                                                 const nlohmann::ordered_json& variables) const {
  // The variables apply_chat_template passes: the special tokens, then the caller's extras,
  // then the conversation itself.
  nlohmann::ordered_json context = source_.special_tokens;
  if (variables.is_object()) {
    for (const auto& [key, value] : variables.items()) context[key] = value;
  }
  context["messages"] = messages;
  context["add_generation_prompt"] = add_generation_prompt;
  context["tools"] = tools;
  context["documents"] = nullptr;
  // Invalid UTF-8 cannot reach here (the JSON parser refuses it), so dump cannot throw.
  const std::string context_json =
      context.dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::replace);
  Interpreter& interpreter = StartInterpreter();
  GilLock gil;
  PyObject* rendered =
      PyObject_CallFunction(interpreter.render, "Os#", static_cast<PyObject*>(compiled_),
                            context_json.data(), static_cast<Py_ssize_t>(context_json.size()));
  if (rendered == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("the chat template rejected the messages: ", TakePythonError()));
  }
  Py_ssize_t size = 0;
  const char* utf8 = PyUnicode_AsUTF8AndSize(rendered, &size);
  if (utf8 == nullptr) {
    Py_DECREF(rendered);
    return absl::InvalidArgumentError(
        absl::StrCat("the chat template did not render text: ", TakePythonError()));
  }
  std::string text(utf8, static_cast<size_t>(size));
  Py_DECREF(rendered);
  return text;
}

}  // namespace moeserve::server
