// moeserve-cli: a command-line client of the moeserve gRPC API (generate, info, health).
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <optional>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "base/build_info.h"
#include "base/tls_files.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "moeserve/v1/generation.grpc.pb.h"

namespace {

const char* FinishReasonName(moeserve::v1::FinishReason reason) {
  switch (reason) {
    case moeserve::v1::FINISH_REASON_LENGTH:
      return "length";
    case moeserve::v1::FINISH_REASON_STOP:
      return "stop";
    case moeserve::v1::FINISH_REASON_CONTEXT_LENGTH:
      return "context_length";
    default:
      return "unspecified";
  }
}

int ReportError(const grpc::Status& status) {
  std::cerr << "error: " << status.error_code() << " " << status.error_message() << "\n";
  return 1;
}

// The channel to the server: plaintext, or TLS per the --tls* flags. Exits the process with a
// message when a TLS file cannot be used.
std::shared_ptr<grpc::Channel> Connect(const std::string& address,
                                       const moeserve::base::TlsClientFiles& tls) {
  absl::StatusOr<std::shared_ptr<grpc::Channel>> channel =
      moeserve::base::MakeChannel(address, tls);
  if (!channel.ok()) {
    std::cerr << "error: --tls-*: " << channel.status().message() << "\n";
    std::exit(2);
  }
  return *channel;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"moeserve-cli: talk to a moeserve server"};
  app.set_version_flag("--version", moeserve::base::Version());
  app.require_subcommand(1);
  std::string address = "127.0.0.1:50051";
  double timeout_seconds = 300;
  app.add_option("--addr", address, "Server address host:port")->capture_default_str();
  app.add_option("--timeout", timeout_seconds, "Deadline of the call in seconds")
      ->capture_default_str();
  moeserve::base::TlsClientFiles tls;
  app.add_flag("--tls", tls.enabled,
               "Speak TLS, trusting the system's CA roots (implied by --tls-ca/--tls-cert)");
  app.add_option("--tls-ca", tls.ca, "PEM CA bundle that signed the server's certificate");
  app.add_option("--tls-cert", tls.cert,
                 "PEM client certificate, for a server that requires one (mTLS)");
  app.add_option("--tls-key", tls.key, "PEM private key of --tls-cert");
  app.add_option("--tls-server-name", tls.server_name,
                 "Name the server's certificate carries, when --addr is an IP address");
  // Global flags may also follow the subcommand (`moeserve-cli info --addr host:port`).
  app.fallthrough();
  int exit_code = 0;

  auto* generate = app.add_subcommand("generate", "Stream a generation to stdout");
  std::string text, request_id;
  std::vector<uint32_t> tokens, stop_token_ids;
  std::vector<std::string> stop;
  uint32_t max_tokens = 16, top_k = 0;
  float temperature = 0.0f, top_p = 0.0f;
  std::optional<uint64_t> seed;
  bool ignore_eos = false, print_ids = false;
  generate->add_option("--text", text, "Prompt text");
  generate->add_option("--tokens", tokens, "Prompt token ids (instead of --text)")->delimiter(',');
  generate->add_option("--max-tokens", max_tokens, "Tokens to generate")->capture_default_str();
  generate->add_option("--temperature", temperature, "0 = greedy")->capture_default_str();
  generate->add_option("--top-p", top_p, "Nucleus mass; 0 = off")->capture_default_str();
  generate->add_option("--top-k", top_k, "0 = off")->capture_default_str();
  generate->add_option("--seed", seed, "Sampling seed (same seed, same tokens)");
  generate->add_option("--stop", stop, "Stop string (repeatable)");
  generate->add_option("--stop-token-id", stop_token_ids, "Stop token id (repeatable)");
  generate->add_option("--request-id", request_id, "Request id");
  generate->add_flag("--ignore-eos", ignore_eos, "Keep generating past end-of-sequence");
  generate->add_flag("--ids", print_ids, "Print token ids instead of text");
  generate->callback([&] {
    moeserve::v1::GenerateRequest request;
    request.set_request_id(request_id);
    if (!tokens.empty()) {
      for (uint32_t id : tokens) request.mutable_token_ids()->add_ids(id);
    } else {
      request.set_text(text);
    }
    request.set_max_tokens(max_tokens);
    request.mutable_sampling()->set_temperature(temperature);
    request.mutable_sampling()->set_top_p(top_p);
    request.mutable_sampling()->set_top_k(top_k);
    if (seed.has_value()) request.mutable_sampling()->set_seed(*seed);
    for (const auto& s : stop) request.add_stop(s);
    for (uint32_t id : stop_token_ids) request.add_stop_token_ids(id);
    request.set_ignore_eos(ignore_eos);

    auto stub = moeserve::v1::Generation::NewStub(Connect(address, tls));
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() +
                         std::chrono::milliseconds(static_cast<int64_t>(timeout_seconds * 1000)));
    const auto start = std::chrono::steady_clock::now();
    auto reader = stub->Generate(&context, request);
    moeserve::v1::GenerateResponse response;
    moeserve::v1::GenerateResponse last;
    std::optional<double> first_message_seconds;
    while (reader->Read(&response)) {
      if (!first_message_seconds) {
        first_message_seconds =
            std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      }
      if (print_ids) {
        for (uint32_t id : response.token_ids()) std::cout << id << " ";
      } else {
        std::cout << response.text();
      }
      std::cout.flush();
      last = response;
    }
    grpc::Status status = reader->Finish();
    std::cout << "\n";
    if (!status.ok()) {
      exit_code = ReportError(status);
      return;
    }
    const auto& usage = last.usage();
    const double elapsed =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::fprintf(stderr,
                 "-- request %s: finish_reason=%s prompt_tokens=%u completion_tokens=%u "
                 "ttft=%.1fms total=%.1fms (client-side %.1fms, %.1f tokens/s)\n",
                 last.request_id().c_str(), FinishReasonName(last.finish_reason()),
                 usage.prompt_tokens(), usage.completion_tokens(),
                 usage.time_to_first_token_seconds() * 1000, usage.total_seconds() * 1000,
                 elapsed * 1000, elapsed > 0 ? usage.completion_tokens() / elapsed : 0.0);
  });

  auto* info = app.add_subcommand("info", "Print the served model and its layout");
  info->callback([&] {
    auto stub = moeserve::v1::Generation::NewStub(Connect(address, tls));
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    moeserve::v1::ModelInfo model_info;
    grpc::Status status = stub->GetModelInfo(&context, {}, &model_info);
    if (!status.ok()) {
      exit_code = ReportError(status);
      return;
    }
    std::cout << model_info.DebugString();
  });

  auto* health = app.add_subcommand("health", "Check grpc.health.v1 (exit 0 when SERVING)");
  health->callback([&] {
    auto stub = grpc::health::v1::Health::NewStub(Connect(address, tls));
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    grpc::health::v1::HealthCheckRequest request;
    grpc::health::v1::HealthCheckResponse response;
    grpc::Status status = stub->Check(&context, request, &response);
    if (!status.ok()) {
      exit_code = ReportError(status);
      return;
    }
    std::cout << grpc::health::v1::HealthCheckResponse::ServingStatus_Name(response.status())
              << "\n";
    exit_code = response.status() == grpc::health::v1::HealthCheckResponse::SERVING ? 0 : 1;
  });

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  return exit_code;
}
