// moeserve-loadgen: a closed-loop load generator for a running moeserve server. For each
// concurrency level C it keeps C streams in flight (each stream sends its next request when the
// previous one finishes) until `--requests` requests completed, and prints one table row:
// output tokens/s (and per GPU), time to first token and inter-token latency percentiles as the
// client sees them.
//
// Prompts are random token ids (so the model needs no tokenizer) of --prompt-tokens length;
// every request generates exactly --max-tokens tokens (ignore_eos), greedy.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "CLI/CLI.hpp"
#include "grpcpp/grpcpp.h"
#include "moeserve/v1/generation.grpc.pb.h"

namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

double Percentile(std::vector<double> values, double p) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  const size_t index = std::min(values.size() - 1, static_cast<size_t>(p * values.size()));
  return values[index];
}

struct LevelResult {
  int concurrency = 0;
  int completed = 0;
  int failed = 0;
  std::string first_error;
  int64_t output_tokens = 0;
  double seconds = 0;
  std::vector<double> ttft, itl;
};

LevelResult RunLevel(const std::shared_ptr<grpc::Channel>& channel, int concurrency, int requests,
                     int prompt_tokens, int max_tokens, uint32_t vocab, uint32_t first_token) {
  LevelResult result;
  result.concurrency = concurrency;
  std::atomic<int> next{0};
  std::mutex mutex;
  const auto start = Clock::now();
  std::vector<std::thread> streams;
  for (int s = 0; s < concurrency; ++s) {
    streams.emplace_back([&, s] {
      auto stub = moeserve::v1::Generation::NewStub(channel);
      std::mt19937 rng(1234 + s);
      std::uniform_int_distribution<uint32_t> token(first_token, vocab - 1);
      while (next.fetch_add(1) < requests) {
        moeserve::v1::GenerateRequest request;
        for (int i = 0; i < prompt_tokens; ++i) request.mutable_token_ids()->add_ids(token(rng));
        request.set_max_tokens(max_tokens);
        request.set_ignore_eos(true);
        grpc::ClientContext context;
        const auto sent = Clock::now();
        auto reader = stub->Generate(&context, request);
        moeserve::v1::GenerateResponse response;
        std::vector<double> token_times;
        int64_t tokens = 0;
        while (reader->Read(&response)) {
          const double at = Seconds(Clock::now() - sent);
          for (int i = 0; i < response.token_ids_size(); ++i) token_times.push_back(at);
          tokens += response.token_ids_size();
        }
        const grpc::Status status = reader->Finish();
        std::lock_guard<std::mutex> lock(mutex);
        if (!status.ok()) {
          ++result.failed;
          if (result.first_error.empty()) result.first_error = status.error_message();
          continue;
        }
        ++result.completed;
        result.output_tokens += tokens;
        if (!token_times.empty()) result.ttft.push_back(token_times.front());
        for (size_t i = 1; i < token_times.size(); ++i) {
          result.itl.push_back(token_times[i] - token_times[i - 1]);
        }
      }
    });
  }
  for (auto& t : streams) t.join();
  result.seconds = Seconds(Clock::now() - start);
  return result;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "moeserve-loadgen: closed-loop load on a moeserve server; prints throughput and "
      "latency percentiles per concurrency level"};
  std::string target = "127.0.0.1:50051";
  std::vector<int> concurrency = {1, 8, 32};
  int requests = 0;
  int connect_timeout = 30;
  int prompt_tokens = 128;
  int max_tokens = 128;
  int gpus = 1;
  int warmup = 2;
  std::string label;
  app.add_option("--target", target, "Server address")->capture_default_str();
  app.add_option("--concurrency", concurrency, "Streams in flight, one table row per value")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--requests", requests,
                 "Requests per concurrency level (0: four per stream, at least 8)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  app.add_option("--connect-timeout", connect_timeout,
                 "Seconds to wait for the server (it may still be loading the model)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--prompt-tokens", prompt_tokens, "Prompt length (random token ids)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--max-tokens", max_tokens, "Generated tokens per request")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--gpus", gpus, "GPUs serving (for the per-GPU column)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--warmup", warmup, "Requests sent (and ignored) before measuring")
      ->capture_default_str();
  app.add_option("--label", label, "First column of each row (e.g. the layout)");
  CLI11_PARSE(app, argc, argv);

  // Retry the connection every second while the server loads its model (gRPC's default
  // back-off grows to two minutes).
  grpc::ChannelArguments channel_args;
  channel_args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  channel_args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 200);
  auto channel =
      grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(), channel_args);
  if (!channel->WaitForConnected(std::chrono::system_clock::now() +
                                 std::chrono::seconds(connect_timeout))) {
    std::cerr << "moeserve-loadgen: cannot connect to " << target << "\n";
    return 1;
  }
  moeserve::v1::ModelInfo info;
  {
    grpc::ClientContext context;
    auto stub = moeserve::v1::Generation::NewStub(channel);
    if (auto status = stub->GetModelInfo(&context, {}, &info); !status.ok()) {
      std::cerr << "moeserve-loadgen: GetModelInfo: " << status.error_message() << "\n";
      return 1;
    }
  }
  // Any id below the vocabulary size is a valid prompt token.
  const uint32_t vocab = info.vocab_size();
  if (warmup > 0) RunLevel(channel, 1, warmup, prompt_tokens, std::min(max_tokens, 8), vocab, 0);
  std::printf(
      "| layout | concurrency | requests | output tok/s | tok/s per GPU | TTFT p50 / p90 / "
      "p99 (ms) | ITL p50 / p90 / p99 (ms) |\n");
  std::printf("|---|---|---|---|---|---|---|\n");
  int exit_code = 0;
  for (int c : concurrency) {
    const int level_requests = requests > 0 ? requests : std::max(8, 4 * c);
    const LevelResult r = RunLevel(channel, c, level_requests, prompt_tokens, max_tokens, vocab, 0);
    const double tokens_per_second = r.output_tokens / r.seconds;
    std::printf("| %s | %d | %d | %.0f | %.0f | %.1f / %.1f / %.1f | %.2f / %.2f / %.2f |\n",
                label.c_str(), c, r.completed, tokens_per_second, tokens_per_second / gpus,
                1e3 * Percentile(r.ttft, 0.5), 1e3 * Percentile(r.ttft, 0.9),
                1e3 * Percentile(r.ttft, 0.99), 1e3 * Percentile(r.itl, 0.5),
                1e3 * Percentile(r.itl, 0.9), 1e3 * Percentile(r.itl, 0.99));
    std::fflush(stdout);
    if (r.failed > 0) {
      std::cerr << "moeserve-loadgen: " << r.failed << " requests failed at concurrency " << c
                << ": " << r.first_error << "\n";
      exit_code = 1;
    }
  }
  return exit_code;
}
