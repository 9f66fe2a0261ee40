#include "server/admin_token.h"

#include <set>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "base/regular_file.h"

namespace moeserve::server {
namespace {

// Words that mark a value someone was meant to replace.
constexpr const char* kPlaceholderWords[] = {
    "change",  "replace", "example", "placeholder", "secret", "password", "token",
    "default", "dummy",   "todo",    "fixme",       "random", "xxxx"};

}  // namespace

absl::Status CheckAdminTokenStrength(const std::string& token) {
  const std::string hint = "generate one with `openssl rand -hex 32`";
  if (token.size() < static_cast<size_t>(kMinAdminTokenLength)) {
    return absl::InvalidArgumentError(absl::StrCat("the admin token has ", token.size(),
                                                   " characters; it needs at least ",
                                                   kMinAdminTokenLength, " (", hint, ")"));
  }
  std::set<char> distinct;
  for (char character : token) {
    if (!absl::ascii_isgraph(static_cast<unsigned char>(character))) {
      return absl::InvalidArgumentError(absl::StrCat(
          "the admin token may hold only printable ASCII characters without spaces (", hint, ")"));
    }
    distinct.insert(character);
  }
  if (distinct.size() < static_cast<size_t>(kMinAdminTokenDistinctCharacters)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the admin token repeats too few characters (", distinct.size(), " distinct, at least ",
        kMinAdminTokenDistinctCharacters, " needed) to be hard to guess (", hint, ")"));
  }
  const std::string lower = absl::AsciiStrToLower(token);
  for (const char* word : kPlaceholderWords) {
    if (absl::StrContains(lower, word)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "the admin token contains `", word, "`, so it looks like a placeholder (", hint, ")"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> ReadAdminToken(const std::string& path) {
  absl::StatusOr<std::string> text = base::ReadRegularFile(path, 64 << 10);
  if (!text.ok()) {
    return absl::Status(text.status().code(),
                        absl::StrCat("the admin token file: ", text.status().message()));
  }
  std::string token(absl::StripAsciiWhitespace(text->substr(0, text->find('\n'))));
  if (token.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("the admin token file ", path, " is empty"));
  }
  if (absl::Status status = CheckAdminTokenStrength(token); !status.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", status.message()));
  }
  return token;
}

}  // namespace moeserve::server
