// moeserve-loadgen: a closed-loop load generator for a running moeserve server. For each
// concurrency level C it keeps C streams in flight (each stream sends its next request when the
// previous one finishes) until `--requests` requests completed, and prints one table row:
// output tokens/s (and per GPU), time to first token and inter-token latency percentiles as the
// client sees them.
//
// It speaks every front door (--protocol, several to compare them on the same server, level by
// level): `native` (moeserve.v1.Generation, streaming), `openai` (POST /v1/completions with
// server-sent events, on --http-target), `openai-chat` (/v1/chat/completions: the chat template
// is rendered per request) and `kserve` (inference.GRPCInferenceService/ModelStreamInfer,
// decoupled). Each stream keeps one connection (HTTP keep-alive; one shared gRPC channel).
//
// Prompts are random token ids (so the model needs no tokenizer) of --prompt-tokens length;
// every request generates exactly --max-tokens tokens (ignore_eos), greedy. openai-chat sends
// --prompt-tokens random lowercase letters as one user message instead (its prompt is that
// text in the model's chat template).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <iostream>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "CLI/CLI.hpp"
#include "base/build_info.h"
#include "curl/curl.h"
#include "grpcpp/grpcpp.h"
#include "inference/grpc_service.grpc.pb.h"
#include "moeserve/v1/generation.grpc.pb.h"
#include "nlohmann/json.hpp"

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

// What one request saw: when each token (or piece of text) arrived, from sending.
struct RequestResult {
  std::string error;  // empty: OK
  std::vector<double> token_times;
  int64_t tokens = 0;
};

// Sends one request with this prompt and waits for its whole stream. Each stream (thread) gets
// its own sender, so a sender may keep a connection.
using Sender = std::function<RequestResult(const std::vector<uint32_t>& prompt)>;
using SenderFactory = std::function<Sender()>;

struct Options {
  int max_tokens = 128;
  std::string model;
  std::string http_target;
};

SenderFactory NativeSenders(std::shared_ptr<grpc::Channel> channel, const Options& options) {
  return [channel, options]() -> Sender {
    auto stub =
        std::shared_ptr<moeserve::v1::Generation::Stub>(moeserve::v1::Generation::NewStub(channel));
    return [stub, options](const std::vector<uint32_t>& prompt) {
      moeserve::v1::GenerateRequest request;
      for (uint32_t id : prompt) request.mutable_token_ids()->add_ids(id);
      request.set_max_tokens(options.max_tokens);
      request.set_ignore_eos(true);
      grpc::ClientContext context;
      const auto sent = Clock::now();
      auto reader = stub->Generate(&context, request);
      moeserve::v1::GenerateResponse response;
      RequestResult result;
      while (reader->Read(&response)) {
        const double at = Seconds(Clock::now() - sent);
        for (int i = 0; i < response.token_ids_size(); ++i) result.token_times.push_back(at);
        result.tokens += response.token_ids_size();
      }
      const grpc::Status status = reader->Finish();
      if (!status.ok()) result.error = status.error_message();
      return result;
    };
  };
}

SenderFactory KServeSenders(std::shared_ptr<grpc::Channel> channel, const Options& options) {
  return [channel, options]() -> Sender {
    auto stub = std::shared_ptr<inference::GRPCInferenceService::Stub>(
        inference::GRPCInferenceService::NewStub(channel));
    return [stub, options](const std::vector<uint32_t>& prompt) {
      inference::ModelInferRequest request;
      request.set_model_name(options.model);
      auto add = [&request](const char* name, const char* datatype, int64_t count, const void* data,
                            size_t bytes) {
        auto* input = request.add_inputs();
        input->set_name(name);
        input->set_datatype(datatype);
        input->add_shape(count);
        request.add_raw_input_contents(std::string(static_cast<const char*>(data), bytes));
      };
      std::vector<int32_t> ids(prompt.begin(), prompt.end());
      add("input_ids", "INT32", static_cast<int64_t>(ids.size()), ids.data(), ids.size() * 4);
      const int32_t max_tokens = options.max_tokens;
      add("max_tokens", "INT32", 1, &max_tokens, 4);
      const bool yes = true;
      add("stream", "BOOL", 1, &yes, 1);
      add("ignore_eos", "BOOL", 1, &yes, 1);
      grpc::ClientContext context;
      const auto sent = Clock::now();
      auto stream = stub->ModelStreamInfer(&context);
      RequestResult result;
      if (!stream->Write(request)) {
        result.error = "ModelStreamInfer: cannot send the request";
        return result;
      }
      stream->WritesDone();
      inference::ModelStreamInferResponse response;
      while (stream->Read(&response)) {
        if (!response.error_message().empty()) {
          result.error = response.error_message();
          continue;
        }
        result.token_times.push_back(Seconds(Clock::now() - sent));
        const auto& parameters = response.infer_response().parameters();
        if (auto it = parameters.find("completion_tokens"); it != parameters.end()) {
          result.tokens = it->second.int64_param();
        }
      }
      const grpc::Status status = stream->Finish();
      if (!status.ok() && result.error.empty()) result.error = status.error_message();
      return result;
    };
  };
}

// One HTTP/1.1 connection (libcurl keeps it alive between requests) reading server-sent events.
class OpenAiConnection {
 public:
  OpenAiConnection(const Options& options, bool chat) : options_(options), chat_(chat) {
    curl_ = curl_easy_init();
    headers_ = curl_slist_append(nullptr, "Content-Type: application/json");
    const std::string url =
        "http://" + options.http_target + (chat ? "/v1/chat/completions" : "/v1/completions");
    curl_easy_setopt(curl_, CURLOPT_URL, url.c_str());
    curl_easy_setopt(curl_, CURLOPT_HTTPHEADER, headers_);
    curl_easy_setopt(curl_, CURLOPT_TCP_NODELAY, 1L);
    curl_easy_setopt(curl_, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(curl_, CURLOPT_WRITEFUNCTION, &OpenAiConnection::OnData);
    curl_easy_setopt(curl_, CURLOPT_WRITEDATA, this);
  }
  ~OpenAiConnection() {
    curl_slist_free_all(headers_);
    curl_easy_cleanup(curl_);
  }

  RequestResult Send(const std::vector<uint32_t>& prompt) {
    nlohmann::json body = {
        {"model", options_.model}, {"max_tokens", options_.max_tokens},
        {"temperature", 0},        {"ignore_eos", true},
        {"stream", true},          {"stream_options", {{"include_usage", true}}}};
    if (chat_) {
      std::string text;
      for (uint32_t id : prompt) text.push_back(static_cast<char>('a' + id % 26));
      body["messages"] = {{{"role", "user"}, {"content", text}}};
    } else {
      body["prompt"] = prompt;
    }
    const std::string payload = body.dump();
    curl_easy_setopt(curl_, CURLOPT_POSTFIELDS, payload.c_str());
    curl_easy_setopt(curl_, CURLOPT_POSTFIELDSIZE, static_cast<long>(payload.size()));
    result_ = RequestResult();
    pending_.clear();
    sent_ = Clock::now();
    const CURLcode code = curl_easy_perform(curl_);
    long status = 0;
    curl_easy_getinfo(curl_, CURLINFO_RESPONSE_CODE, &status);
    if (code != CURLE_OK) {
      result_.error = curl_easy_strerror(code);
    } else if (status != 200) {
      result_.error = "HTTP " + std::to_string(status) + ": " + pending_;
    }
    return std::move(result_);
  }

 private:
  static size_t OnData(char* data, size_t size, size_t count, void* self) {
    static_cast<OpenAiConnection*>(self)->Consume(std::string_view(data, size * count));
    return size * count;
  }

  // Each "data: {...}\n\n" event with a choice is one engine message (one token in decode); the
  // usage event gives the token count.
  void Consume(std::string_view bytes) {
    const double at = Seconds(Clock::now() - sent_);
    pending_.append(bytes);
    size_t end;
    while ((end = pending_.find("\n\n")) != std::string::npos) {
      const std::string_view event(pending_.data(), end);
      if (event.starts_with("data: {")) {
        if (event.find("\"error\":") != std::string_view::npos &&
            event.find("\"choices\"") == std::string_view::npos) {
          result_.error = std::string(event.substr(6));
        } else if (event.find("\"choices\":[]") != std::string_view::npos) {
          const size_t key = event.find("\"completion_tokens\":");
          if (key != std::string_view::npos) {
            result_.tokens = std::strtoll(event.data() + key + 20, nullptr, 10);
          }
        } else {
          result_.token_times.push_back(at);
        }
      }
      pending_.erase(0, end + 2);
    }
  }

  Options options_;
  bool chat_;
  CURL* curl_ = nullptr;
  curl_slist* headers_ = nullptr;
  RequestResult result_;
  std::string pending_;
  Clock::time_point sent_;
};

SenderFactory OpenAiSenders(const Options& options, bool chat) {
  return [options, chat]() -> Sender {
    auto connection = std::make_shared<OpenAiConnection>(options, chat);
    return [connection](const std::vector<uint32_t>& prompt) { return connection->Send(prompt); };
  };
}

LevelResult RunLevel(const SenderFactory& senders, int concurrency, int requests, int prompt_tokens,
                     uint32_t vocab) {
  LevelResult result;
  result.concurrency = concurrency;
  std::atomic<int> next{0};
  std::mutex mutex;
  const auto start = Clock::now();
  std::vector<std::thread> streams;
  for (int s = 0; s < concurrency; ++s) {
    streams.emplace_back([&, s] {
      Sender send = senders();
      std::mt19937 rng(1234 + s);
      std::uniform_int_distribution<uint32_t> token(0, vocab - 1);
      while (next.fetch_add(1) < requests) {
        std::vector<uint32_t> prompt(prompt_tokens);
        for (uint32_t& id : prompt) id = token(rng);
        RequestResult request = send(prompt);
        std::lock_guard<std::mutex> lock(mutex);
        if (!request.error.empty()) {
          ++result.failed;
          if (result.first_error.empty()) result.first_error = request.error;
          continue;
        }
        ++result.completed;
        result.output_tokens += request.tokens;
        const auto& times = request.token_times;
        if (!times.empty()) result.ttft.push_back(times.front());
        for (size_t i = 1; i < times.size(); ++i) result.itl.push_back(times[i] - times[i - 1]);
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
  app.set_version_flag("--version", moeserve::base::Version());
  std::string target = "127.0.0.1:50051";
  std::vector<int> concurrency = {1, 8, 32};
  int requests = 0;
  int connect_timeout = 30;
  int prompt_tokens = 128;
  int max_tokens = 128;
  int gpus = 1;
  int warmup = 2;
  std::string label;
  std::vector<std::string> protocols = {"native"};
  std::string http_target = "127.0.0.1:8000";
  app.add_option("--target", target, "Server gRPC address (native, kserve)")->capture_default_str();
  app.add_option("--protocol", protocols,
                 "Front doors to drive, each in turn at every level: native, openai, "
                 "openai-chat, kserve")
      ->capture_default_str()
      ->check(CLI::IsMember({"native", "openai", "openai-chat", "kserve"}));
  app.add_option("--http-target", http_target, "Server OpenAI HTTP address (openai, openai-chat)")
      ->capture_default_str();
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
    // The server listens before its model is loaded (UNAVAILABLE until then): wait for it
    // within the same connect timeout.
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(connect_timeout);
    auto stub = moeserve::v1::Generation::NewStub(channel);
    while (true) {
      grpc::ClientContext context;
      const grpc::Status status = stub->GetModelInfo(&context, {}, &info);
      if (status.ok()) break;
      if (status.error_code() != grpc::StatusCode::UNAVAILABLE ||
          std::chrono::steady_clock::now() > give_up) {
        std::cerr << "moeserve-loadgen: GetModelInfo: " << status.error_message() << "\n";
        return 1;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
  }
  // Any id below the vocabulary size is a valid prompt token.
  const uint32_t vocab = info.vocab_size();
  curl_global_init(CURL_GLOBAL_DEFAULT);
  const Options options{.max_tokens = max_tokens, .model = info.name(), .http_target = http_target};
  auto senders_for = [&](const std::string& protocol, int tokens) {
    Options o = options;
    o.max_tokens = tokens;
    if (protocol == "openai") return OpenAiSenders(o, /*chat=*/false);
    if (protocol == "openai-chat") return OpenAiSenders(o, /*chat=*/true);
    if (protocol == "kserve") return KServeSenders(channel, o);
    return NativeSenders(channel, o);
  };
  if (warmup > 0) {
    for (const std::string& protocol : protocols) {
      RunLevel(senders_for(protocol, std::min(max_tokens, 8)), 1, warmup, prompt_tokens, vocab);
    }
  }
  std::printf(
      "| layout | front door | concurrency | requests | output tok/s | tok/s per GPU | TTFT p50 / "
      "p90 / p99 (ms) | ITL p50 / p90 / p99 (ms) |\n");
  std::printf("|---|---|---|---|---|---|---|---|\n");
  int exit_code = 0;
  for (int c : concurrency) {
    const int level_requests = requests > 0 ? requests : std::max(8, 4 * c);
    // Front doors take turns at each level, so each is measured on the same server and load.
    for (const std::string& protocol : protocols) {
      const LevelResult r =
          RunLevel(senders_for(protocol, max_tokens), c, level_requests, prompt_tokens, vocab);
      const double tokens_per_second = r.output_tokens / r.seconds;
      std::printf("| %s | %s | %d | %d | %.0f | %.0f | %.1f / %.1f / %.1f | %.2f / %.2f / %.2f |\n",
                  label.c_str(), protocol.c_str(), c, r.completed, tokens_per_second,
                  tokens_per_second / gpus, 1e3 * Percentile(r.ttft, 0.5),
                  1e3 * Percentile(r.ttft, 0.9), 1e3 * Percentile(r.ttft, 0.99),
                  1e3 * Percentile(r.itl, 0.5), 1e3 * Percentile(r.itl, 0.9),
                  1e3 * Percentile(r.itl, 0.99));
      std::fflush(stdout);
      if (r.failed > 0) {
        std::cerr << "moeserve-loadgen: " << r.failed << " " << protocol
                  << " requests failed at concurrency " << c << ": " << r.first_error << "\n";
        exit_code = 1;
      }
    }
  }
  return exit_code;
}
