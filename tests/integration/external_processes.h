// Helpers of the integration tests for things outside moeserve: free ports, a real Prometheus
// on loopback (plain or over TLS), shell commands, and TLS certificates made at test time with
// the openssl command line. Test-only; not thread-safe.
#pragma once

#include <sys/types.h>

#include <string>
#include <vector>

namespace moeserve::testing {

// A loopback port nothing listens on right now.
int FreePort();

struct CommandResult {
  int exit_code = -1;
  std::string output;  // stdout and stderr
};
CommandResult RunCommand(const std::string& command);

// A CA, a server certificate for localhost and 127.0.0.1, a client certificate from the same CA,
// and a client certificate from another CA (which servers must refuse). PEM files in `dir`.
struct TestCertificates {
  std::string dir;
  std::string ca;
  std::string server_cert, server_key;
  std::string client_cert, client_key;
  std::string rogue_client_cert, rogue_client_key;
};
// Fails the test (ADD_FAILURE) when openssl does.
TestCertificates MakeTestCertificates(const std::string& name);

// Prometheus' own TLS: set, it serves its API over HTTPS.
struct PrometheusTlsOptions {
  std::string cert, key;
};

// A real Prometheus on loopback, scraping its targets (loopback ports) every second.
class PrometheusProcess {
 public:
  explicit PrometheusProcess(int target_port, const PrometheusTlsOptions& tls = {});
  explicit PrometheusProcess(const std::vector<int>& target_ports,
                             const PrometheusTlsOptions& tls = {});
  ~PrometheusProcess();
  std::string url() const;
  int port() const { return port_; }

 private:
  int port_;
  bool https_;
  pid_t pid_ = -1;
  std::string dir_;
};

}  // namespace moeserve::testing
