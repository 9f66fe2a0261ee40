// ServerProcess: starts the real `moeserve serve` (or `frontend`) binary on loopback with free
// ports, waits for its ready line, and stops it (SIGTERM) when destroyed; ChildProcess runs any
// other subcommand (rank, node). Also small helpers to scrape /metrics.
// Used by integration tests only; not thread-safe.
#pragma once

#include <sys/types.h>

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "moeserve/v1/generation.grpc.pb.h"

namespace moeserve::testing {

// A child process of the real moeserve binary (any subcommand) whose stdout and stderr are
// captured; killed (SIGTERM, then SIGKILL after 30 s) when destroyed.
class ChildProcess {
 public:
  // `args` follow the binary (MOESERVE_BINARY, or the build's); `environment` (NAME=VALUE)
  // is added to the child's.
  explicit ChildProcess(std::vector<std::string> args, std::vector<std::string> environment = {});
  ~ChildProcess();
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;

  // Reads output until `pattern` matches it (the match's groups, whole match first) or
  // `timeout_seconds` pass or the process exits (empty).
  std::vector<std::string> WaitForOutput(const std::string& pattern, double timeout_seconds);
  // Waits until the output contains `text`; false after `timeout_seconds` or once it exited.
  bool WaitForText(const std::string& text, double timeout_seconds);
  pid_t pid() const { return pid_; }
  bool exited() const { return exited_; }
  // Sends a signal; WaitForExit returns the exit code (or -signal), -1000 on timeout.
  void Signal(int signal_number);
  int WaitForExit(double timeout_seconds);
  // Everything the process printed so far (stdout and stderr).
  std::string output();

 private:
  void ReadAvailable(int timeout_ms);
  void RecordExit(int wait_status);
  pid_t pid_ = -1;
  int output_fd_ = -1;
  bool exited_ = false;
  int exit_code_ = -1000;
  std::string output_;
};

class ServerProcess {
 public:
  // Starts `moeserve <subcommand> --host 127.0.0.1 --port 0 --metrics-port 0 --http-port 0
  // <extra_args>` (extra_args that name --host, --port, --metrics-port or --http-port replace
  // those); fails the test (ADD_FAILURE) and leaves ok() false if it does not become ready
  // within 60 s.
  // With expect_ready = false, a server that exits before becoming ready is not a failure
  // (tests of refused configurations). With wait_for_ready = false the constructor returns once
  // the process is started (tests of start-up; see WaitForOutput). `subcommand` may be
  // "frontend" (same front doors, same ready line).
  explicit ServerProcess(std::vector<std::string> extra_args, bool expect_ready = true,
                         bool wait_for_ready = true, const std::string& subcommand = "serve");

  // With wait_for_ready = false: waits for the line that says the model is loading and takes
  // the gRPC and metrics ports from it (the server answers health checks and scrapes while it
  // loads); false after `timeout_seconds`.
  bool WaitForLoading(double timeout_seconds);
  bool ok() const { return port_ > 0; }
  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }
  int metrics_port() const { return metrics_port_; }
  int port() const { return port_; }
  int http_port() const { return http_port_; }  // -1 when HTTP is off
  // The Admin API's own port (--admin-port), 0 when it shares the gRPC port.
  int admin_port() const { return admin_port_; }
  pid_t pid() const { return process_.pid(); }
  std::shared_ptr<grpc::Channel> channel() const;

  // Sends a signal; WaitForExit returns the exit code (or -signal), -1000 on timeout.
  void Signal(int signal_number) { process_.Signal(signal_number); }
  int WaitForExit(double timeout_seconds) { return process_.WaitForExit(timeout_seconds); }
  // Everything the process printed so far (stdout and stderr).
  std::string output() { return process_.output(); }
  // Waits until the output contains `text`; false after `timeout_seconds` or once it exited.
  bool WaitForOutput(const std::string& text, double timeout_seconds) {
    return process_.WaitForText(text, timeout_seconds);
  }

 private:
  ChildProcess process_;
  int port_ = 0;
  int metrics_port_ = 0;
  int admin_port_ = 0;
  int http_port_ = -1;
};

// Greedy generation of `max_tokens` tokens (ignoring <eos>) of `prompt`; the call's status in
// `status`.
std::vector<uint32_t> GreedyTokens(v1::Generation::Stub& stub, const std::string& prompt,
                                   uint32_t max_tokens, grpc::Status* status);
// The same for a prompt of token ids (models without a tokenizer).
std::vector<uint32_t> GreedyTokens(v1::Generation::Stub& stub,
                                   const std::vector<uint32_t>& prompt_ids, uint32_t max_tokens,
                                   grpc::Status* status);

// Greedy tokens of `count` concurrent requests (prompts of different lengths, so prefill chunks
// and decode steps mix), in request order; request i generates max_tokens(i) tokens. Each
// request's status must be OK (a test failure otherwise).
std::vector<std::vector<uint32_t>> ConcurrentGreedy(ServerProcess& server, int count,
                                                    const std::function<uint32_t(int)>& max_tokens);
// The same requests one after another: each step holds one request, whatever the server's
// layout (for comparing GPU layouts, whose bits depend on a batch's size).
std::vector<std::vector<uint32_t>> SequentialGreedy(ServerProcess& server, int count,
                                                    const std::function<uint32_t(int)>& max_tokens);

// The server's grpc.health.v1 status for `service` ("" for the whole server); SERVICE_UNKNOWN
// when the check itself fails.
grpc::health::v1::HealthCheckResponse::ServingStatus Health(ServerProcess& server,
                                                            const std::string& service);

// GET http://127.0.0.1:port/metrics; empty on failure.
std::string ScrapeMetrics(int port);
// The value of the first sample whose line starts with `series` (e.g. `moeserve_running_requests`
// or `moeserve_requests_total{status="length"}`); -1 when absent.
double MetricValue(const std::string& metrics_text, const std::string& series);

}  // namespace moeserve::testing
