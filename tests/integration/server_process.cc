#include "tests/integration/server_process.h"

#include <curl/curl.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <regex>
#include <sstream>
#include <thread>

#include "gtest/gtest.h"

namespace moeserve::testing {

ChildProcess::ChildProcess(std::vector<std::string> args, std::vector<std::string> environment) {
  int pipe_fds[2];
  if (pipe(pipe_fds) != 0) {
    ADD_FAILURE() << "pipe failed";
    return;
  }
  // MOESERVE_BINARY in the environment overrides the build's path (tests run from a copied
  // build, e.g. on a GPU host).
  const char* binary = std::getenv("MOESERVE_BINARY");
  args.insert(args.begin(), binary != nullptr ? binary : MOESERVE_BINARY);
  pid_ = fork();
  if (pid_ == 0) {
    for (std::string& variable : environment) putenv(variable.data());
    dup2(pipe_fds[1], STDOUT_FILENO);
    dup2(pipe_fds[1], STDERR_FILENO);
    close(pipe_fds[0]);
    close(pipe_fds[1]);
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    execv(argv[0], argv.data());
    _exit(127);
  }
  close(pipe_fds[1]);
  output_fd_ = pipe_fds[0];
}

ChildProcess::~ChildProcess() {
  if (!exited_ && pid_ > 0) {
    kill(pid_, SIGTERM);
    if (WaitForExit(30) == -1000) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
  }
  if (output_fd_ >= 0) close(output_fd_);
}

std::vector<std::string> ChildProcess::WaitForOutput(const std::string& pattern,
                                                     double timeout_seconds) {
  const std::regex expression(pattern);
  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::milliseconds(static_cast<int64_t>(timeout_seconds * 1000));
  while (true) {
    ReadAvailable(50);
    std::smatch match;
    if (std::regex_search(output_, match, expression)) {
      std::vector<std::string> groups;
      for (const auto& group : match) groups.push_back(group.matched ? group.str() : "");
      return groups;
    }
    if (exited_ || std::chrono::steady_clock::now() >= deadline) return {};
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      RecordExit(status);
      ReadAvailable(100);
    }
  }
}

bool ChildProcess::WaitForText(const std::string& text, double timeout_seconds) {
  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::milliseconds(static_cast<int64_t>(timeout_seconds * 1000));
  while (true) {
    ReadAvailable(50);
    if (output_.find(text) != std::string::npos) return true;
    if (exited_ || std::chrono::steady_clock::now() >= deadline) return false;
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      RecordExit(status);
      ReadAvailable(100);
    }
  }
}

void ChildProcess::Signal(int signal_number) {
  if (!exited_ && pid_ > 0) kill(pid_, signal_number);
}

void ChildProcess::RecordExit(int wait_status) {
  exited_ = true;
  if (WIFEXITED(wait_status))
    exit_code_ = WEXITSTATUS(wait_status);
  else if (WIFSIGNALED(wait_status))
    exit_code_ = -WTERMSIG(wait_status);
  else
    exit_code_ = -999;
}

int ChildProcess::WaitForExit(double timeout_seconds) {
  if (exited_) return exit_code_;
  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::milliseconds(static_cast<int64_t>(timeout_seconds * 1000));
  while (std::chrono::steady_clock::now() < deadline) {
    ReadAvailable(20);
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      RecordExit(status);
      ReadAvailable(0);
      return exit_code_;
    }
  }
  return -1000;
}

std::string ChildProcess::output() {
  ReadAvailable(0);
  return output_;
}

void ChildProcess::ReadAvailable(int timeout_ms) {
  if (output_fd_ < 0) return;
  pollfd fd{output_fd_, POLLIN, 0};
  while (poll(&fd, 1, timeout_ms) > 0 && (fd.revents & POLLIN)) {
    char buffer[4096];
    const ssize_t n = read(output_fd_, buffer, sizeof(buffer));
    if (n <= 0) break;
    output_.append(buffer, n);
    timeout_ms = 0;
  }
}

namespace {

std::vector<std::string> ServerArguments(const std::string& subcommand,
                                         std::vector<std::string> extra_args) {
  // MOESERVE_TEST_METRICS_PORT=-1 turns /metrics off where the host's sandbox refuses the
  // metrics web server.
  const char* metrics_port = std::getenv("MOESERVE_TEST_METRICS_PORT");
  std::vector<std::string> args = {subcommand};
  // Tests run side by side: never the fixed default ports.
  const std::pair<const char*, std::string> defaults[] = {
      {"--host", "127.0.0.1"},
      {"--port", "0"},
      {"--metrics-port", metrics_port != nullptr ? metrics_port : "0"},
      {"--http-port", "0"}};
  for (const auto& [flag, value] : defaults) {
    if (std::find(extra_args.begin(), extra_args.end(), flag) != extra_args.end()) continue;
    args.push_back(flag);
    args.push_back(value);
  }
  args.insert(args.end(), extra_args.begin(), extra_args.end());
  return args;
}

}  // namespace

ServerProcess::ServerProcess(std::vector<std::string> extra_args, bool expect_ready,
                             bool wait_for_ready, const std::string& subcommand)
    : process_(ServerArguments(subcommand, std::move(extra_args))) {
  if (!wait_for_ready) return;
  const std::vector<std::string> ready = process_.WaitForOutput(
      R"(serving \S+ on [0-9.]+:(\d+) \(metrics on (?:[0-9.]+:(\d+)|disabled), OpenAI HTTP on (?:[0-9.]+:(\d+)|off))",
      60);
  if (!ready.empty()) {
    port_ = std::stoi(ready[1]);
    metrics_port_ = !ready[2].empty() ? std::stoi(ready[2]) : -1;
    http_port_ = !ready[3].empty() ? std::stoi(ready[3]) : -1;
    const std::vector<std::string> admin = process_.WaitForOutput(R"(, admin [0-9.]+:(\d+)\))", 0);
    if (!admin.empty()) admin_port_ = std::stoi(admin[1]);
    return;
  }
  if (expect_ready) {
    ADD_FAILURE() << "moeserve did not become ready; output:\n" << process_.output();
  }
}

bool ServerProcess::WaitForLoading(double timeout_seconds) {
  const std::vector<std::string> loading = process_.WaitForOutput(
      R"(loading \S+ \(listening on [0-9.]+:(\d+), metrics on (?:[0-9.]+:(\d+)|disabled);)",
      timeout_seconds);
  if (loading.empty()) return false;
  port_ = std::stoi(loading[1]);
  metrics_port_ = !loading[2].empty() ? std::stoi(loading[2]) : -1;
  return true;
}

std::shared_ptr<grpc::Channel> ServerProcess::channel() const {
  return grpc::CreateChannel(address(), grpc::InsecureChannelCredentials());
}

namespace {
size_t AppendToString(char* data, size_t size, size_t count, void* out) {
  static_cast<std::string*>(out)->append(data, size * count);
  return size * count;
}
}  // namespace

namespace {
// Greedy generation of `request`'s prompt, `max_tokens` tokens ignoring <eos>.
std::vector<uint32_t> Greedy(v1::Generation::Stub& stub, v1::GenerateRequest& request,
                             uint32_t max_tokens, grpc::Status* status) {
  request.set_max_tokens(max_tokens);
  request.set_ignore_eos(true);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
  auto reader = stub.Generate(&context, request);
  std::vector<uint32_t> tokens;
  v1::GenerateResponse response;
  while (reader->Read(&response)) {
    tokens.insert(tokens.end(), response.token_ids().begin(), response.token_ids().end());
  }
  *status = reader->Finish();
  return tokens;
}
}  // namespace

std::vector<uint32_t> GreedyTokens(v1::Generation::Stub& stub, const std::string& prompt,
                                   uint32_t max_tokens, grpc::Status* status) {
  v1::GenerateRequest request;
  request.set_text(prompt);
  return Greedy(stub, request, max_tokens, status);
}

std::vector<uint32_t> GreedyTokens(v1::Generation::Stub& stub,
                                   const std::vector<uint32_t>& prompt_ids, uint32_t max_tokens,
                                   grpc::Status* status) {
  v1::GenerateRequest request;
  for (uint32_t id : prompt_ids) request.mutable_token_ids()->add_ids(id);
  return Greedy(stub, request, max_tokens, status);
}

namespace {
// The prompt of ConcurrentGreedy's and SequentialGreedy's request i.
std::string NumberedPrompt(int i) {
  return "request " + std::to_string(i) + std::string(i * 7, '.');
}
}  // namespace

std::vector<std::vector<uint32_t>> ConcurrentGreedy(
    ServerProcess& server, int count, const std::function<uint32_t(int)>& max_tokens) {
  std::vector<std::vector<uint32_t>> results(count);
  std::vector<std::thread> threads;
  for (int i = 0; i < count; ++i) {
    threads.emplace_back([&, i] {
      auto stub = v1::Generation::NewStub(server.channel());
      grpc::Status status;
      results[i] = GreedyTokens(*stub, NumberedPrompt(i), max_tokens(i), &status);
      EXPECT_TRUE(status.ok()) << status.error_message();
    });
  }
  for (auto& t : threads) t.join();
  return results;
}

std::vector<std::vector<uint32_t>> SequentialGreedy(
    ServerProcess& server, int count, const std::function<uint32_t(int)>& max_tokens) {
  std::vector<std::vector<uint32_t>> results(count);
  auto stub = v1::Generation::NewStub(server.channel());
  for (int i = 0; i < count; ++i) {
    grpc::Status status;
    results[i] = GreedyTokens(*stub, NumberedPrompt(i), max_tokens(i), &status);
    EXPECT_TRUE(status.ok()) << status.error_message();
  }
  return results;
}

grpc::health::v1::HealthCheckResponse::ServingStatus Health(ServerProcess& server,
                                                            const std::string& service) {
  auto stub = grpc::health::v1::Health::NewStub(server.channel());
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  grpc::health::v1::HealthCheckRequest request;
  request.set_service(service);
  grpc::health::v1::HealthCheckResponse response;
  if (!stub->Check(&context, request, &response).ok()) {
    return grpc::health::v1::HealthCheckResponse::SERVICE_UNKNOWN;
  }
  return response.status();
}

std::string ScrapeMetrics(int port) {
  std::string body;
  CURL* curl = curl_easy_init();
  if (curl == nullptr) return body;
  const std::string url = "http://127.0.0.1:" + std::to_string(port) + "/metrics";
  curl_easy_setopt(curl, CURLOPT_URL, url.c_str());
  curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, AppendToString);
  curl_easy_setopt(curl, CURLOPT_WRITEDATA, &body);
  curl_easy_setopt(curl, CURLOPT_TIMEOUT, 10L);
  if (curl_easy_perform(curl) != CURLE_OK) body.clear();
  curl_easy_cleanup(curl);
  return body;
}

double MetricValue(const std::string& metrics_text, const std::string& series) {
  std::istringstream lines(metrics_text);
  std::string line;
  while (std::getline(lines, line)) {
    if (line.rfind(series + " ", 0) == 0) return std::stod(line.substr(series.size() + 1));
  }
  return -1;
}

}  // namespace moeserve::testing
