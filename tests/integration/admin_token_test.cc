// Admin tokens: short or placeholder ones (the Kubernetes manifest's example among them) keep
// the server from starting, with a message that does not echo the token.
#include <unistd.h>

#include <fstream>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/integration/server_process.h"

namespace moeserve::testing {
namespace {

using ::testing::HasSubstr;

std::string WriteFile(const std::string& name, const std::string& text) {
  const std::string path =
      ::testing::TempDir() + "/moeserve-admin-token-test-" + name + "-" + std::to_string(getpid());
  std::ofstream(path) << text << "\n";
  return path;
}

TEST(AdminToken, ShortOrPlaceholderTokensDoNotStartAServer) {
  const struct {
    const char* token;
    const char* message;
  } cases[] = {
      {"change-me-to-a-long-random-string", "looks like a placeholder"},  // the manifest's
      {"s3cr3t", "needs at least 32"},
      {"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "too few characters"},
      {"REPLACE_WITH_OUTPUT_OF_OPENSSL_RAND_HEX_32", "looks like a placeholder"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.token);
    ServerProcess server({"--admin-token-file", WriteFile("weak", c.token)},
                         /*expect_ready=*/false);
    EXPECT_FALSE(server.ok());
    EXPECT_EQ(server.WaitForExit(30), 1);
    EXPECT_THAT(server.output(), HasSubstr(c.message));
    EXPECT_THAT(server.output(), ::testing::Not(HasSubstr(c.token))) << "tokens are not echoed";
  }
}

}  // namespace
}  // namespace moeserve::testing
