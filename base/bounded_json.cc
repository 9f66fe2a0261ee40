#include "base/bounded_json.h"

#include <string>

#include "absl/strings/str_cat.h"

namespace moeserve::base {

absl::Status CheckJsonNesting(std::string_view text, int max_depth) {
  int depth = 0;
  bool in_string = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char character = text[i];
    if (in_string) {
      if (character == '\\') {
        ++i;  // the escaped character may be a quote
      } else if (character == '"') {
        in_string = false;
      }
    } else if (character == '"') {
      in_string = true;
    } else if (character == '[' || character == '{') {
      if (++depth > max_depth) {
        return absl::InvalidArgumentError(
            absl::StrCat("nested more than ", max_depth, " levels deep"));
      }
    } else if (character == ']' || character == '}') {
      --depth;
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<nlohmann::json> ParseBoundedJson(std::string_view text, int max_depth) {
  if (absl::Status status = CheckJsonNesting(text, max_depth); !status.ok()) return status;
  try {
    return nlohmann::json::parse(text.begin(), text.end());
  } catch (const nlohmann::json::exception& error) {
    // what() reads "[json.exception.parse_error.101] parse error at line 1, column 5: ...";
    // keep the readable part.
    std::string_view message = error.what();
    if (const size_t bracket = message.find("] "); bracket != std::string_view::npos) {
      message.remove_prefix(bracket + 2);
    }
    return absl::InvalidArgumentError(std::string(message));
  }
}

}  // namespace moeserve::base
