// TLS end to end with certificates made at test time: the gRPC port (server certificate, then
// required client certificates), the Admin API on its own port (mTLS, or the token over TLS),
// the command-line and Python clients, and the EPLB controller speaking TLS to its targets and
// to a Prometheus that serves its API over HTTPS.
#include <unistd.h>

#include <atomic>
#include <fstream>
#include <thread>

#include "base/tls_files.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "moeserve/v1/admin.grpc.pb.h"
#include "tests/integration/external_processes.h"
#include "tests/integration/server_process.h"

namespace moeserve::testing {
namespace {

using ::testing::HasSubstr;

constexpr char kToken[] = "9d2f6b1e8a4c7f3e0b5d9a2c6e1f8b4d";

std::string WriteFile(const std::string& name, const std::string& text) {
  const std::string path =
      ::testing::TempDir() + "/moeserve-tls-test-" + name + "-" + std::to_string(getpid());
  std::ofstream(path) << text << "\n";
  return path;
}

std::shared_ptr<grpc::Channel> Channel(const std::string& address, const std::string& ca,
                                       const std::string& cert = "", const std::string& key = "") {
  base::TlsClientFiles files;
  files.ca = ca;
  files.cert = cert;
  files.key = key;
  absl::StatusOr<std::shared_ptr<grpc::Channel>> channel = base::MakeChannel(address, files);
  EXPECT_TRUE(channel.ok()) << channel.status();
  return *channel;
}

grpc::Status Info(const std::shared_ptr<grpc::Channel>& channel) {
  auto stub = v1::Generation::NewStub(channel);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  v1::ModelInfo info;
  return stub->GetModelInfo(&context, v1::GetModelInfoRequest(), &info);
}

grpc::Status GetPlacement(const std::shared_ptr<grpc::Channel>& channel, const std::string& token,
                          v1::ExpertPlacement* placement) {
  auto stub = v1::Admin::NewStub(channel);
  grpc::ClientContext context;
  if (!token.empty()) context.AddMetadata("authorization", "Bearer " + token);
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  return stub->GetExpertPlacement(&context, v1::GetExpertPlacementRequest(), placement);
}

TEST(Tls, GenerationOverTlsFromCppTheCliAndPython) {
  const TestCertificates certs = MakeTestCertificates("generation");
  ServerProcess server({"--tls-cert", certs.server_cert, "--tls-key", certs.server_key});
  ASSERT_TRUE(server.ok());
  EXPECT_THAT(server.output(), HasSubstr("TLS on"));

  auto stub = v1::Generation::NewStub(Channel(server.address(), certs.ca));
  grpc::Status status;
  EXPECT_EQ(GreedyTokens(*stub, "over TLS", 8, &status).size(), 8u);
  EXPECT_TRUE(status.ok()) << status.error_message();
  EXPECT_FALSE(Info(server.channel()).ok()) << "a plaintext client must not get through";
  // Trusting another CA is refused too.
  base::TlsClientFiles system_roots;
  system_roots.enabled = true;
  EXPECT_FALSE(Info(*base::MakeChannel(server.address(), system_roots)).ok());

  const CommandResult cli =
      RunCommand(std::string(MOESERVE_CLI_BINARY) + " --addr " + server.address() + " --tls-ca " +
                 certs.ca + " generate --text hi --max-tokens 4 --ids");
  EXPECT_EQ(cli.exit_code, 0) << cli.output;
  EXPECT_THAT(cli.output, HasSubstr("finish_reason=length"));
  const CommandResult cli_health = RunCommand(std::string(MOESERVE_CLI_BINARY) + " health --addr " +
                                              server.address() + " --tls-ca " + certs.ca);
  EXPECT_EQ(cli_health.exit_code, 0) << cli_health.output;

  const CommandResult python = RunCommand(std::string(SYSTEM_PYTHON3) + " " + MOESERVE_SOURCE_DIR +
                                          "/clients/python/generate.py --addr " + server.address() +
                                          " --tls-ca " + certs.ca + " --text hi --max-tokens 4");
  EXPECT_EQ(python.exit_code, 0) << python.output;
  EXPECT_THAT(python.output, HasSubstr("FINISH_REASON_LENGTH: 4 tokens"));
}

TEST(Tls, RequiredClientCertificatesMustComeFromTheClientCa) {
  const TestCertificates certs = MakeTestCertificates("mutual");
  ServerProcess server({"--tls-cert", certs.server_cert, "--tls-key", certs.server_key,
                        "--tls-client-ca", certs.ca});
  ASSERT_TRUE(server.ok());
  EXPECT_TRUE(Info(Channel(server.address(), certs.ca, certs.client_cert, certs.client_key)).ok());
  EXPECT_FALSE(Info(Channel(server.address(), certs.ca)).ok()) << "no client certificate";
  EXPECT_FALSE(
      Info(Channel(server.address(), certs.ca, certs.rogue_client_cert, certs.rogue_client_key))
          .ok())
      << "a client certificate from another CA";
  const CommandResult python =
      RunCommand(std::string(SYSTEM_PYTHON3) + " " + MOESERVE_SOURCE_DIR +
                 "/clients/python/generate.py --addr " + server.address() + " --tls-ca " +
                 certs.ca + " --tls-cert " + certs.client_cert + " --tls-key " + certs.client_key +
                 " --text hi --max-tokens 2");
  EXPECT_EQ(python.exit_code, 0) << python.output;
}

TEST(Tls, AdminApiOnItsOwnPortByClientCertificateOrTokenOverTls) {
  const TestCertificates certs = MakeTestCertificates("admin");
  // Client certificates alone.
  ServerProcess mutual({"--admin-port", "0", "--admin-tls-cert", certs.server_cert,
                        "--admin-tls-key", certs.server_key, "--admin-tls-client-ca", certs.ca});
  ASSERT_TRUE(mutual.ok());
  ASSERT_GT(mutual.admin_port(), 0) << mutual.output();
  const std::string admin_address = "127.0.0.1:" + std::to_string(mutual.admin_port());
  v1::ExpertPlacement placement;
  EXPECT_TRUE(GetPlacement(Channel(admin_address, certs.ca, certs.client_cert, certs.client_key),
                           "", &placement)
                  .ok());
  EXPECT_GT(placement.layers_size(), 0);
  EXPECT_FALSE(GetPlacement(Channel(admin_address, certs.ca), "", &placement).ok());
  EXPECT_FALSE(GetPlacement(Channel(admin_address, certs.ca, certs.rogue_client_cert,
                                    certs.rogue_client_key),
                            "", &placement)
                   .ok());
  // Not on the public port.
  EXPECT_EQ(GetPlacement(mutual.channel(), "", &placement).error_code(),
            grpc::StatusCode::UNIMPLEMENTED);

  // The token over TLS (the gRPC port's certificate serves the admin port too).
  ServerProcess token({"--tls-cert", certs.server_cert, "--tls-key", certs.server_key,
                       "--admin-port", "0", "--admin-token-file", WriteFile("token", kToken)});
  ASSERT_TRUE(token.ok());
  const std::string token_address = "127.0.0.1:" + std::to_string(token.admin_port());
  EXPECT_TRUE(GetPlacement(Channel(token_address, certs.ca), kToken, &placement).ok());
  EXPECT_EQ(GetPlacement(Channel(token_address, certs.ca), "", &placement).error_code(),
            grpc::StatusCode::UNAUTHENTICATED);

  // An admin port without TLS is refused at start-up.
  ServerProcess plaintext({"--admin-port", "0", "--admin-token-file", WriteFile("t2", kToken)},
                          /*expect_ready=*/false);
  EXPECT_EQ(plaintext.WaitForExit(30), 1);
  EXPECT_THAT(plaintext.output(), HasSubstr("the Admin API's own port speaks TLS only"));
}

TEST(Tls, ControllerSpeaksTlsToTargetsAndToPrometheus) {
  const TestCertificates certs = MakeTestCertificates("controller");
  ServerProcess server({"--ep", "2", "--num-redundant-experts", "4", "--tls-cert",
                        certs.server_cert, "--tls-key", certs.server_key, "--admin-port", "0",
                        "--admin-tls-client-ca", certs.ca});
  ASSERT_TRUE(server.ok());
  PrometheusProcess prometheus(server.metrics_port(),
                               {.cert = certs.server_cert, .key = certs.server_key});

  std::atomic<bool> stop{false};
  std::thread traffic([&] {
    auto stub = v1::Generation::NewStub(Channel(server.address(), certs.ca));
    for (int i = 0; i < 2000 && !stop; ++i) {
      grpc::Status status;
      GreedyTokens(*stub, "traffic " + std::to_string(i % 13), 16, &status);
    }
  });
  const std::string controller =
      std::string(MOESERVE_EPLB_BINARY) + " controller --prometheus-url " + prometheus.url() +
      " --prometheus-ca " + certs.ca +
      " --targets 127.0.0.1:" + std::to_string(server.admin_port()) + " --tls-ca " + certs.ca +
      " --tls-cert " + certs.client_cert + " --tls-key " + certs.client_key +
      " --group mixed --window 20s --once --dry-run --min-improvement 0";
  // Prometheus needs a few scrapes before increase() has data; retry, bounded.
  CommandResult dry;
  for (int attempt = 0; attempt < 90; ++attempt) {
    dry = RunCommand(controller);
    if (dry.exit_code == 0) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
  }
  stop = true;
  traffic.join();
  EXPECT_EQ(dry.exit_code, 0) << dry.output;
  EXPECT_THAT(dry.output, HasSubstr("group mixed: balancedness"));

  // Without the client certificate the Admin port refuses the controller.
  const CommandResult refused = RunCommand(
      std::string(MOESERVE_EPLB_BINARY) + " controller --prometheus-url " + prometheus.url() +
      " --prometheus-ca " + certs.ca +
      " --targets 127.0.0.1:" + std::to_string(server.admin_port()) + " --tls-ca " + certs.ca +
      " --admin-token-file " + WriteFile("controller-token", kToken) + " --once --dry-run");
  EXPECT_NE(refused.exit_code, 0) << refused.output;
}

}  // namespace
}  // namespace moeserve::testing
