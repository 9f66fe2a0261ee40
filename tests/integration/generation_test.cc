// Integration tests of `moeserve serve` through its public gRPC API on loopback.
#include <signal.h>

#include <atomic>
#include <chrono>
#include <regex>
#include <thread>

#include "gmock/gmock.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpc/reflection/v1alpha/reflection.grpc.pb.h"
#include "gtest/gtest.h"
#include "moeserve/v1/generation.grpc.pb.h"
#include "tests/integration/server_process.h"

namespace moeserve::testing {
namespace {

using ::testing::HasSubstr;
using v1::GenerateRequest;
using v1::GenerateResponse;

struct Result {
  grpc::Status status;
  std::vector<uint32_t> tokens;
  std::string text;
  v1::FinishReason finish_reason = v1::FINISH_REASON_UNSPECIFIED;
  v1::Usage usage;
  int messages = 0;
};

Result Generate(v1::Generation::Stub& stub, const GenerateRequest& request,
                double timeout_seconds = 120) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::milliseconds(static_cast<int64_t>(timeout_seconds * 1000)));
  Result result;
  auto reader = stub.Generate(&context, request);
  GenerateResponse response;
  while (reader->Read(&response)) {
    ++result.messages;
    result.tokens.insert(result.tokens.end(), response.token_ids().begin(),
                         response.token_ids().end());
    result.text += response.text();
    if (response.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) {
      result.finish_reason = response.finish_reason();
      result.usage = response.usage();
    }
  }
  result.status = reader->Finish();
  return result;
}

GenerateRequest TextRequest(const std::string& text, uint32_t max_tokens) {
  GenerateRequest request;
  request.set_text(text);
  request.set_max_tokens(max_tokens);
  // The built-in model's random weights may emit <eos> at any point; tests that count tokens
  // must not depend on where.
  request.set_ignore_eos(true);
  return request;
}

GenerateRequest TokenRequest(std::vector<uint32_t> ids, uint32_t max_tokens) {
  GenerateRequest request;
  for (uint32_t id : ids) request.mutable_token_ids()->add_ids(id);
  request.set_max_tokens(max_tokens);
  request.set_ignore_eos(true);
  return request;
}

// Polls /metrics until `series` equals `value` (or 20 s pass); returns the last value seen.
double WaitForMetric(int port, const std::string& series, double value) {
  double seen = -1;
  for (int i = 0; i < 400; ++i) {
    seen = MetricValue(ScrapeMetrics(port), series);
    if (seen == value) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return seen;
}

class GenerationTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { server_ = new ServerProcess({"--max-queue", "256"}); }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
  }
  void SetUp() override {
    ASSERT_TRUE(server_->ok());
    stub_ = v1::Generation::NewStub(server_->channel());
  }
  static ServerProcess* server_;
  std::unique_ptr<v1::Generation::Stub> stub_;
};
ServerProcess* GenerationTest::server_ = nullptr;

TEST_F(GenerationTest, HealthIsServing) {
  auto health = grpc::health::v1::Health::NewStub(server_->channel());
  grpc::ClientContext context;
  grpc::health::v1::HealthCheckResponse response;
  ASSERT_TRUE(health->Check(&context, {}, &response).ok());
  EXPECT_EQ(response.status(), grpc::health::v1::HealthCheckResponse::SERVING);
}

// `--version` prints the version that /metrics reports as moeserve_build_info.
TEST_F(GenerationTest, VersionFlagAndBuildInfoAgree) {
  ChildProcess version({"--version"});
  ASSERT_EQ(version.WaitForExit(30), 0);
  std::smatch match;
  const std::string printed = version.output();
  ASSERT_TRUE(std::regex_search(printed, match, std::regex(R"(^(\d+\.\d+\.\d+)\s*$)"))) << printed;
  EXPECT_EQ(
      MetricValue(ScrapeMetrics(server_->metrics_port()),
                  "moeserve_build_info{component=\"server\",version=\"" + match[1].str() + "\"}"),
      1);
}

TEST_F(GenerationTest, ReflectionListsTheGenerationService) {
  auto reflection = grpc::reflection::v1alpha::ServerReflection::NewStub(server_->channel());
  grpc::ClientContext context;
  auto stream = reflection->ServerReflectionInfo(&context);
  grpc::reflection::v1alpha::ServerReflectionRequest request;
  request.set_list_services("");
  ASSERT_TRUE(stream->Write(request));
  stream->WritesDone();
  grpc::reflection::v1alpha::ServerReflectionResponse response;
  ASSERT_TRUE(stream->Read(&response));
  std::vector<std::string> services;
  for (const auto& service : response.list_services_response().service()) {
    services.push_back(service.name());
  }
  EXPECT_THAT(services, ::testing::Contains("moeserve.v1.Generation"));
  EXPECT_THAT(services, ::testing::Contains("grpc.health.v1.Health"));
  stream->Finish();
}

TEST_F(GenerationTest, ModelInfoDescribesTheBuiltinModel) {
  grpc::ClientContext context;
  v1::ModelInfo info;
  ASSERT_TRUE(stub_->GetModelInfo(&context, {}, &info).ok());
  EXPECT_EQ(info.name(), "builtin:tiny");
  EXPECT_EQ(info.architecture(), "deepseek_v3");
  EXPECT_EQ(info.vocab_size(), 258u);
  EXPECT_EQ(info.context_length(), 4096u);
  EXPECT_EQ(info.num_layers(), 4u);
  EXPECT_EQ(info.num_dense_layers(), 1u);
  EXPECT_EQ(info.num_routed_experts(), 64u);
  EXPECT_EQ(info.num_experts_per_token(), 6u);
  EXPECT_EQ(info.num_expert_groups(), 8u);
  EXPECT_EQ(info.num_groups_per_token(), 4u);
  EXPECT_TRUE(info.has_tokenizer());
  EXPECT_EQ(info.layout().device(), "cpu");
}

TEST_F(GenerationTest, StreamsExactlyMaxTokensWithUsage) {
  Result result = Generate(*stub_, TextRequest("hi", 16));
  ASSERT_TRUE(result.status.ok()) << result.status.error_message();
  EXPECT_EQ(result.tokens.size(), 16u);
  EXPECT_EQ(result.messages, 16);  // one message per token: really streamed
  EXPECT_EQ(result.finish_reason, v1::FINISH_REASON_LENGTH);
  EXPECT_EQ(result.usage.prompt_tokens(), 3u);  // <bos> h i
  EXPECT_EQ(result.usage.completion_tokens(), 16u);
  EXPECT_GT(result.usage.time_to_first_token_seconds(), 0.0);
  EXPECT_GE(result.usage.total_seconds(), result.usage.time_to_first_token_seconds());
}

TEST_F(GenerationTest, TextIsTheUtf8OfTheTokenBytes) {
  // The byte tokenizer maps token t < 256 to byte t; valid UTF-8 text must round-trip.
  GenerateRequest request = TextRequest("héllo wörld", 8);
  Result result = Generate(*stub_, request);
  ASSERT_TRUE(result.status.ok());
  std::string bytes;
  for (uint32_t t : result.tokens) {
    if (t < 256) bytes.push_back(static_cast<char>(t));
  }
  // Whatever bytes the model produced, the streamed text is valid UTF-8 (protobuf parsed it)
  // and equals the bytes when they are themselves valid ASCII.
  bool ascii = std::all_of(bytes.begin(), bytes.end(), [](char c) { return (c & 0x80) == 0; });
  if (ascii) {
    EXPECT_EQ(result.text, bytes);
  }
  EXPECT_FALSE(result.text.empty());
}

TEST_F(GenerationTest, GreedyIsDeterministicAndTokenIdsEqualText) {
  Result by_text = Generate(*stub_, TextRequest("abc", 12));
  Result by_ids = Generate(*stub_, TokenRequest({256, 'a', 'b', 'c'}, 12));
  ASSERT_TRUE(by_text.status.ok());
  ASSERT_TRUE(by_ids.status.ok());
  EXPECT_EQ(by_text.tokens, by_ids.tokens);
}

TEST_F(GenerationTest, SameSeedSameTokensDifferentSeedDifferentTokens) {
  GenerateRequest request = TextRequest("sampling", 24);
  request.mutable_sampling()->set_temperature(1.0f);
  request.mutable_sampling()->set_top_p(0.95f);
  request.mutable_sampling()->set_top_k(50);
  request.mutable_sampling()->set_seed(7);
  Result first = Generate(*stub_, request);
  Result second = Generate(*stub_, request);
  request.mutable_sampling()->set_seed(8);
  Result other = Generate(*stub_, request);
  ASSERT_TRUE(first.status.ok());
  EXPECT_EQ(first.tokens, second.tokens);
  EXPECT_NE(first.tokens, other.tokens);
}

TEST_F(GenerationTest, StopTokenAndStopStringEndWithStop) {
  Result reference = Generate(*stub_, TextRequest("stop here", 10));
  ASSERT_TRUE(reference.status.ok());
  ASSERT_EQ(reference.tokens.size(), 10u);
  GenerateRequest with_stop_token = TextRequest("stop here", 10);
  with_stop_token.add_stop_token_ids(reference.tokens[4]);
  Result stopped = Generate(*stub_, with_stop_token);
  ASSERT_TRUE(stopped.status.ok());
  EXPECT_EQ(stopped.finish_reason, v1::FINISH_REASON_STOP);
  // Stops at the first occurrence of that token (included).
  const auto first =
      std::find(reference.tokens.begin(), reference.tokens.end(), reference.tokens[4]);
  EXPECT_EQ(stopped.tokens.size(), static_cast<size_t>(first - reference.tokens.begin()) + 1);

  // A stop string made of ASCII the model produced: text ends before it.
  GenerateRequest ascii = TokenRequest({256, 'x'}, 64);
  Result long_run = Generate(*stub_, ascii);
  ASSERT_TRUE(long_run.status.ok());
  std::string ascii_text;
  for (char c : long_run.text) {
    if ((c & 0x80) == 0 && c != 0) ascii_text.push_back(c);
  }
  if (ascii_text.size() >= 2) {
    const std::string stop = long_run.text.substr(long_run.text.find(ascii_text.substr(0, 1)), 1);
    GenerateRequest with_stop = ascii;
    with_stop.add_stop(stop);
    Result cut = Generate(*stub_, with_stop);
    ASSERT_TRUE(cut.status.ok());
    EXPECT_EQ(cut.finish_reason, v1::FINISH_REASON_STOP);
    EXPECT_EQ(cut.text, long_run.text.substr(0, long_run.text.find(stop)));
  }
}

struct InvalidCase {
  std::string name;
  GenerateRequest request;
  std::string message;
};

TEST_F(GenerationTest, BadRequestsGetInvalidArgumentWithActionableMessages) {
  std::vector<InvalidCase> cases;
  cases.push_back({"no input",
                   [] {
                     GenerateRequest r;
                     r.set_max_tokens(4);
                     return r;
                   }(),
                   "no input"});
  cases.push_back({"empty text", TextRequest("", 4), "text is empty"});
  cases.push_back({"empty ids",
                   [] {
                     GenerateRequest r;
                     r.mutable_token_ids();
                     r.set_max_tokens(4);
                     return r;
                   }(),
                   "no input"});
  cases.push_back({"id >= vocab", TokenRequest({1, 258}, 4), "token_ids[1] = 258 is out of range"});
  cases.push_back({"huge id", TokenRequest({4000000000u}, 4), "out of range"});
  cases.push_back({"max_tokens 0", TextRequest("hi", 0), "max_tokens must be at least 1"});
  cases.push_back({"max_tokens > context", TextRequest("hi", 5000), "exceeds the context length"});
  cases.push_back({"prompt + max_tokens > context", TextRequest("hi", 4094),
                   "lower max_tokens to at most 4093"});
  cases.push_back({"oversized prompt", TextRequest(std::string(5000, 'a'), 1), "context length"});
  cases.push_back({"oversized text", TextRequest(std::string(1 << 20, 'a'), 1), "context length"});
  auto sampling = [](float temperature, float top_p) {
    GenerateRequest r = TextRequest("hi", 4);
    r.mutable_sampling()->set_temperature(temperature);
    r.mutable_sampling()->set_top_p(top_p);
    return r;
  };
  cases.push_back({"negative temperature", sampling(-0.5f, 1), "temperature"});
  cases.push_back({"nan temperature", sampling(std::nanf(""), 1), "temperature"});
  cases.push_back({"infinite temperature", sampling(INFINITY, 1), "temperature"});
  cases.push_back({"top_p > 1", sampling(1, 1.5f), "top_p must be in [0, 1]"});
  cases.push_back({"top_p < 0", sampling(1, -0.1f), "top_p must be in [0, 1]"});
  cases.push_back({"nan top_p", sampling(1, std::nanf("")), "top_p"});
  cases.push_back({"empty stop string",
                   [] {
                     auto r = TextRequest("hi", 4);
                     r.add_stop("");
                     return r;
                   }(),
                   "stop strings"});
  cases.push_back({"stop token out of range",
                   [] {
                     auto r = TextRequest("hi", 4);
                     r.add_stop_token_ids(999);
                     return r;
                   }(),
                   "stop_token_ids"});
  for (const InvalidCase& c : cases) {
    Result result = Generate(*stub_, c.request);
    EXPECT_EQ(result.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << c.name;
    EXPECT_THAT(result.status.error_message(), HasSubstr(c.message)) << c.name;
    EXPECT_EQ(result.messages, 0) << c.name;
  }
  // The server is still healthy and serving afterwards.
  EXPECT_TRUE(Generate(*stub_, TextRequest("ok", 2)).status.ok());
}

// A server paced to 5 ms per step, so long requests stay in flight long enough to cancel.
class PacedServerTest : public GenerationTest {
 protected:
  static void SetUpTestSuite() { server_ = new ServerProcess({"--min-step-ms", "5"}); }
};

TEST_F(PacedServerTest, ClientCancellationStopsWorkAndFreesKvBlocks) {
  grpc::ClientContext context;
  auto reader = stub_->Generate(&context, TextRequest("long", 4000));
  GenerateResponse response;
  ASSERT_TRUE(reader->Read(&response));
  EXPECT_GT(MetricValue(ScrapeMetrics(server_->metrics_port()), "moeserve_kv_cache_usage_ratio"),
            0);
  context.TryCancel();
  while (reader->Read(&response)) {
  }
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_EQ(WaitForMetric(server_->metrics_port(), "moeserve_kv_cache_usage_ratio", 0), 0);
  EXPECT_EQ(WaitForMetric(server_->metrics_port(), "moeserve_running_requests", 0), 0);
  EXPECT_GE(MetricValue(ScrapeMetrics(server_->metrics_port()),
                        "moeserve_requests_total{status=\"cancelled\"}"),
            1);
}

TEST_F(PacedServerTest, DeadlineExpiryStopsWorkAndFreesKvBlocks) {
  Result result = Generate(*stub_, TextRequest("deadline", 4000), /*timeout_seconds=*/0.3);
  EXPECT_EQ(result.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_LT(result.tokens.size(), 4000u);
  EXPECT_EQ(WaitForMetric(server_->metrics_port(), "moeserve_kv_cache_usage_ratio", 0), 0);
  EXPECT_EQ(WaitForMetric(server_->metrics_port(), "moeserve_running_requests", 0), 0);
}

TEST_F(GenerationTest, SixtyFourConcurrentStreamsFinishAndGreedyIsBatchInvariant) {
  const GenerateRequest probe = TextRequest("the same prompt", 20);
  Result alone = Generate(*stub_, probe);
  ASSERT_TRUE(alone.status.ok());
  std::vector<Result> results(64);
  std::vector<std::thread> threads;
  for (int i = 0; i < 64; ++i) {
    threads.emplace_back([&, i] {
      auto stub = v1::Generation::NewStub(server_->channel());
      if (i == 0) {
        results[i] = Generate(*stub, probe);
      } else if (i % 4 == 1) {
        // Stops on the first token of its own greedy continuation → STOP after 1 token.
        GenerateRequest request = TextRequest("prompt " + std::to_string(i), 30);
        request.mutable_sampling()->set_temperature(0.8f);
        request.mutable_sampling()->set_seed(i);
        for (uint32_t t = 0; t < 258; ++t) request.add_stop_token_ids(t);
        results[i] = Generate(*stub, request);
      } else {
        GenerateRequest request = TextRequest("prompt number " + std::to_string(i), 10 + i);
        request.mutable_sampling()->set_temperature(i % 2 ? 0.7f : 0.0f);
        request.mutable_sampling()->set_seed(i);
        results[i] = Generate(*stub, request);
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(results[0].tokens, alone.tokens);
  for (int i = 1; i < 64; ++i) {
    ASSERT_TRUE(results[i].status.ok()) << i << ": " << results[i].status.error_message();
    if (i % 4 == 1) {
      EXPECT_EQ(results[i].finish_reason, v1::FINISH_REASON_STOP) << i;
      EXPECT_EQ(results[i].tokens.size(), 1u) << i;
    } else {
      EXPECT_EQ(results[i].finish_reason, v1::FINISH_REASON_LENGTH) << i;
      EXPECT_EQ(results[i].tokens.size(), static_cast<size_t>(10 + i)) << i;
    }
  }
  const std::string metrics = ScrapeMetrics(server_->metrics_port());
  EXPECT_GE(MetricValue(metrics, "moeserve_requests_total{status=\"length\"}"), 48);
  EXPECT_GT(MetricValue(metrics, "moeserve_time_to_first_token_seconds_count"), 64);
  EXPECT_GT(MetricValue(metrics, "moeserve_inter_token_latency_seconds_count"), 0);
  EXPECT_GT(MetricValue(metrics, "moeserve_e2e_request_latency_seconds_count"), 0);
  EXPECT_GT(MetricValue(metrics, "moeserve_queue_time_seconds_count"), 0);
  EXPECT_GT(MetricValue(metrics, "moeserve_prompt_tokens_total"), 0);
  EXPECT_GT(MetricValue(metrics, "moeserve_generation_tokens_total"), 0);
  EXPECT_EQ(MetricValue(metrics, "moeserve_waiting_requests"), 0);
}

TEST(ServerLimits, FullQueueGetsResourceExhaustedAndServerStaysHealthy) {
  ServerProcess server({"--max-queue", "1", "--max-running-requests", "1", "--min-step-ms", "5"});
  ASSERT_TRUE(server.ok());
  auto stub = v1::Generation::NewStub(server.channel());
  // One long request runs, one waits; the third finds the queue full.
  grpc::ClientContext running_context, waiting_context;
  auto running = stub->Generate(&running_context, TextRequest("first", 4000));
  GenerateResponse response;
  ASSERT_TRUE(running->Read(&response));
  auto waiting = stub->Generate(&waiting_context, TextRequest("second", 4000));
  ASSERT_EQ(WaitForMetric(server.metrics_port(), "moeserve_waiting_requests", 1), 1);
  Result rejected = Generate(*stub, TextRequest("third", 4));
  EXPECT_EQ(rejected.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(rejected.status.error_message(), HasSubstr("queue is full"));
  running_context.TryCancel();
  waiting_context.TryCancel();
  while (running->Read(&response)) {
  }
  while (waiting->Read(&response)) {
  }
  running->Finish();
  waiting->Finish();
  // Cancellation reaches the engine within a step; then the queue has room again.
  EXPECT_EQ(WaitForMetric(server.metrics_port(), "moeserve_waiting_requests", 0), 0);
  EXPECT_EQ(WaitForMetric(server.metrics_port(), "moeserve_running_requests", 0), 0);
  auto health = grpc::health::v1::Health::NewStub(server.channel());
  grpc::ClientContext health_context;
  grpc::health::v1::HealthCheckResponse health_response;
  ASSERT_TRUE(health->Check(&health_context, {}, &health_response).ok());
  EXPECT_EQ(health_response.status(), grpc::health::v1::HealthCheckResponse::SERVING);
  Result after = Generate(*stub, TextRequest("after", 3));
  EXPECT_TRUE(after.status.ok()) << after.status.error_message();
}

TEST(ServerLifecycle, SigtermFinishesInFlightStreamsThenExitsZero) {
  ServerProcess server({"--shutdown-grace-seconds", "30"});
  ASSERT_TRUE(server.ok());
  auto stub = v1::Generation::NewStub(server.channel());
  grpc::ClientContext context;
  auto reader = stub->Generate(&context, TextRequest("in flight", 600));
  GenerateResponse response;
  ASSERT_TRUE(reader->Read(&response));
  int tokens = response.token_ids_size();
  server.Signal(SIGTERM);
  v1::FinishReason finish = v1::FINISH_REASON_UNSPECIFIED;
  while (reader->Read(&response)) {
    tokens += response.token_ids_size();
    if (response.finish_reason() != v1::FINISH_REASON_UNSPECIFIED)
      finish = response.finish_reason();
  }
  EXPECT_TRUE(reader->Finish().ok());
  EXPECT_EQ(tokens, 600);
  EXPECT_EQ(finish, v1::FINISH_REASON_LENGTH);
  EXPECT_EQ(server.WaitForExit(30), 0) << server.output();
  EXPECT_THAT(server.output(), HasSubstr("received SIGTERM"));
}

}  // namespace
}  // namespace moeserve::testing
