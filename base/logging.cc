#include "base/logging.h"

#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <ctime>
#include <memory>

#include "absl/strings/str_cat.h"
#include "spdlog/formatter.h"
#include "spdlog/sinks/stdout_sinks.h"
#include "spdlog/spdlog.h"

namespace moeserve::base {
namespace {

constexpr char kLevelVariable[] = "MOESERVE_LOG_LEVEL";
constexpr char kFormatVariable[] = "MOESERVE_LOG_FORMAT";

// "2026-12-06T07:01:02.123456Z": RFC 3339 in UTC with microseconds.
void AppendTimestamp(std::chrono::system_clock::time_point time, spdlog::memory_buf_t& out) {
  const auto micros =
      std::chrono::duration_cast<std::chrono::microseconds>(time.time_since_epoch()).count();
  const std::time_t seconds = static_cast<std::time_t>(micros / 1000000);
  std::tm utc{};
  gmtime_r(&seconds, &utc);
  char text[40];
  const size_t length = std::strftime(text, sizeof(text), "%Y-%m-%dT%H:%M:%S", &utc);
  out.append(text, text + length);
  const int fraction =
      std::snprintf(text, sizeof(text), ".%06lldZ", static_cast<long long>(micros % 1000000));
  out.append(text, text + fraction);
}

void AppendJsonString(spdlog::string_view_t text, spdlog::memory_buf_t& out) {
  out.push_back('"');
  for (const char c : text) {
    switch (c) {
      case '"':
        out.append(std::string_view("\\\""));
        break;
      case '\\':
        out.append(std::string_view("\\\\"));
        break;
      case '\n':
        out.append(std::string_view("\\n"));
        break;
      case '\r':
        out.append(std::string_view("\\r"));
        break;
      case '\t':
        out.append(std::string_view("\\t"));
        break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          char escaped[8];
          const int length = std::snprintf(escaped, sizeof(escaped), "\\u%04x", c);
          out.append(escaped, escaped + length);
        } else {
          out.push_back(c);
        }
    }
  }
  out.push_back('"');
}

// One JSON object per line: {"time", "level", "component", "pid", "thread", "message"}. Message
// bytes pass through unchanged apart from escaping (moeserve logs UTF-8).
class JsonFormatter final : public spdlog::formatter {
 public:
  explicit JsonFormatter(std::string component) : component_(std::move(component)) {}

  void format(const spdlog::details::log_msg& message, spdlog::memory_buf_t& out) override {
    out.append(std::string_view("{\"time\":\""));
    AppendTimestamp(message.time, out);
    out.append(std::string_view("\",\"level\":"));
    const spdlog::string_view_t level = spdlog::level::to_string_view(message.level);
    AppendJsonString(level, out);
    out.append(std::string_view(",\"component\":"));
    AppendJsonString(component_, out);
    const std::string ids =
        absl::StrCat(",\"pid\":", getpid(), ",\"thread\":", message.thread_id, ",\"message\":");
    out.append(ids.data(), ids.data() + ids.size());
    AppendJsonString(message.payload, out);
    out.append(std::string_view("}\n"));
  }

  std::unique_ptr<spdlog::formatter> clone() const override {
    return std::make_unique<JsonFormatter>(component_);
  }

 private:
  const std::string component_;
};

// "2026-12-06T07:01:02.123456Z info  message".
class TextFormatter final : public spdlog::formatter {
 public:
  void format(const spdlog::details::log_msg& message, spdlog::memory_buf_t& out) override {
    AppendTimestamp(message.time, out);
    out.push_back(' ');
    const spdlog::string_view_t level = spdlog::level::to_string_view(message.level);
    out.append(level.data(), level.data() + level.size());
    for (size_t i = level.size(); i < 6; ++i) out.push_back(' ');
    out.append(message.payload.data(), message.payload.data() + message.payload.size());
    out.push_back('\n');
  }

  std::unique_ptr<spdlog::formatter> clone() const override {
    return std::make_unique<TextFormatter>();
  }
};

}  // namespace

void AddLoggingOptions(CLI::App& app, LogOptions& options) {
  if (const char* level = std::getenv(kLevelVariable); level != nullptr && *level != '\0') {
    options.level = level;
  }
  if (const char* format = std::getenv(kFormatVariable); format != nullptr && *format != '\0') {
    options.format = format;
  }
  app.add_option("--log-level", options.level,
                 "Least severe log lines written to stderr: trace, debug (adds one line per "
                 "request), info, warn, error or off (default $MOESERVE_LOG_LEVEL, else info)")
      ->capture_default_str()
      ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error", "off"}));
  app.add_option("--log-format", options.format,
                 "Log lines as text (`TIME LEVEL message`) or json (one object per line: time, "
                 "level, component, pid, thread, message; default $MOESERVE_LOG_FORMAT, else text)")
      ->capture_default_str()
      ->check(CLI::IsMember({"text", "json"}));
}

absl::Status ConfigureLogging(const LogOptions& options, const std::string& component) {
  const spdlog::level::level_enum level = spdlog::level::from_str(options.level);
  if (level == spdlog::level::off && options.level != "off") {
    return absl::InvalidArgumentError(absl::StrCat("unknown log level `", options.level,
                                                   "` (trace, debug, info, warn, error, off)"));
  }
  std::unique_ptr<spdlog::formatter> formatter;
  if (options.format == "json") {
    formatter = std::make_unique<JsonFormatter>(component);
  } else if (options.format == "text") {
    formatter = std::make_unique<TextFormatter>();
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown log format `", options.format, "` (text or json)"));
  }
  auto logger = std::make_shared<spdlog::logger>(component,
                                                 std::make_shared<spdlog::sinks::stderr_sink_mt>());
  logger->set_formatter(std::move(formatter));
  logger->set_level(level);
  // Every line is flushed: logs are read live (kubectl logs) and must survive a crash.
  logger->flush_on(spdlog::level::trace);
  spdlog::set_default_logger(std::move(logger));
  setenv(kLevelVariable, options.level.c_str(), /*overwrite=*/1);
  setenv(kFormatVariable, options.format.c_str(), /*overwrite=*/1);
  return absl::OkStatus();
}

}  // namespace moeserve::base
