#include "tests/integration/external_processes.h"

#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>

#include "gtest/gtest.h"

namespace moeserve::testing {

int FreePort() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address));
  socklen_t length = sizeof(address);
  getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length);
  close(fd);
  return ntohs(address.sin_port);
}

CommandResult RunCommand(const std::string& command) {
  CommandResult result;
  FILE* pipe = popen((command + " 2>&1").c_str(), "r");
  if (pipe == nullptr) return result;
  char buffer[4096];
  while (size_t n = fread(buffer, 1, sizeof(buffer), pipe)) result.output.append(buffer, n);
  const int status = pclose(pipe);
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return result;
}

TestCertificates MakeTestCertificates(const std::string& name) {
  TestCertificates c;
  c.dir = ::testing::TempDir() + "/moeserve-certificates-" + name + "-" + std::to_string(getpid());
  std::filesystem::remove_all(c.dir);
  std::filesystem::create_directories(c.dir);
  c.ca = c.dir + "/ca.pem";
  c.server_cert = c.dir + "/server.pem";
  c.server_key = c.dir + "/server.key";
  c.client_cert = c.dir + "/client.pem";
  c.client_key = c.dir + "/client.key";
  c.rogue_client_cert = c.dir + "/rogue-client.pem";
  c.rogue_client_key = c.dir + "/rogue-client.key";
  std::ofstream(c.dir + "/server.ext")
      << "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n";
  std::ofstream(c.dir + "/client.ext") << "extendedKeyUsage=clientAuth\n";
  const std::string ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
  const std::string ca_extensions =
      "-addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign";
  // A certificate signed by `ca_name`'s CA for `subject`, with extensions from `ext`.
  auto signed_by = [&](const std::string& ca_name, const std::string& out,
                       const std::string& subject, const std::string& ext) {
    return "openssl req " + ec + " -keyout " + out + ".key -out " + out +
           ".csr -subj /CN=" + subject + " && openssl x509 -req -in " + out + ".csr -CA " +
           ca_name + ".pem -CAkey " + ca_name + ".key -CAcreateserial -days 2 -extfile " + c.dir +
           "/" + ext + " -out " + out + ".pem";
  };
  const std::string d = c.dir + "/";
  const std::string script =
      "cd " + c.dir + " && openssl req -x509 " + ec + " -keyout ca.key -out ca.pem -days 2 " +
      "-subj /CN=moeserve-test-ca " + ca_extensions + " && openssl req -x509 " + ec +
      " -keyout rogue-ca.key -out rogue-ca.pem -days 2 -subj /CN=rogue-ca " + ca_extensions +
      " && " + signed_by("ca", "server", "localhost", "server.ext") + " && " +
      signed_by("ca", "client", "moeserve-test-client", "client.ext") + " && " +
      signed_by("rogue-ca", "rogue-client", "rogue-client", "client.ext");
  const CommandResult result = RunCommand(script);
  if (result.exit_code != 0) ADD_FAILURE() << "openssl failed:\n" << result.output;
  return c;
}

PrometheusProcess::PrometheusProcess(int target_port, const PrometheusTlsOptions& tls)
    : PrometheusProcess(std::vector<int>{target_port}, tls) {}

PrometheusProcess::PrometheusProcess(const std::vector<int>& target_ports,
                                     const PrometheusTlsOptions& tls)
    : port_(FreePort()), https_(!tls.cert.empty()) {
  dir_ = ::testing::TempDir() + "/moeserve-prometheus-" + std::to_string(getpid()) + "-" +
         std::to_string(port_);
  std::filesystem::remove_all(dir_);
  std::filesystem::create_directories(dir_ + "/data");
  std::ofstream config(dir_ + "/prometheus.yml");
  config << "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
         << "scrape_configs:\n  - job_name: moeserve\n    static_configs:\n"
         << "      - targets: [";
  for (size_t i = 0; i < target_ports.size(); ++i) {
    config << (i > 0 ? ", " : "") << "'127.0.0.1:" << target_ports[i] << "'";
  }
  config << "]\n";
  config.close();
  std::string web_config;
  if (https_) {
    web_config = "--web.config.file=" + dir_ + "/web.yml";
    std::ofstream(dir_ + "/web.yml")
        << "tls_server_config:\n  cert_file: " << tls.cert << "\n  key_file: " << tls.key << "\n";
  }
  pid_ = fork();
  if (pid_ == 0) {
    const std::string config_flag = "--config.file=" + dir_ + "/prometheus.yml";
    const std::string storage = "--storage.tsdb.path=" + dir_ + "/data";
    const std::string listen = "--web.listen-address=127.0.0.1:" + std::to_string(port_);
    const std::string log = dir_ + "/prometheus.log";
    freopen(log.c_str(), "w", stdout);
    freopen(log.c_str(), "w", stderr);
    if (https_) {
      execl(PROMETHEUS_BINARY, PROMETHEUS_BINARY, config_flag.c_str(), storage.c_str(),
            listen.c_str(), web_config.c_str(), static_cast<char*>(nullptr));
    } else {
      execl(PROMETHEUS_BINARY, PROMETHEUS_BINARY, config_flag.c_str(), storage.c_str(),
            listen.c_str(), static_cast<char*>(nullptr));
    }
    _exit(127);
  }
}

PrometheusProcess::~PrometheusProcess() {
  kill(pid_, SIGTERM);
  waitpid(pid_, nullptr, 0);
  std::filesystem::remove_all(dir_);
}

std::string PrometheusProcess::url() const {
  return std::string(https_ ? "https" : "http") + "://127.0.0.1:" + std::to_string(port_);
}

}  // namespace moeserve::testing
