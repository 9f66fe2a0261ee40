// engine::Engine on builtin:tiny: continuous batching, chunked prefill, admission and
// validation, cancellation, stop conditions. Greedy outputs are compared with a plain greedy
// decode through Model::Forward (no scheduler) and across batch shapes.
#include "engine/engine.h"

#include <atomic>
#include <chrono>
#include <cmath>
#include <limits>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "engine/model/loader.h"
#include "engine/runtime/block_allocator.h"
#include "engine/sampling/sampler.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "prometheus/registry.h"

namespace moeserve::engine {
namespace {

using ::testing::ElementsAreArray;
using ::testing::HasSubstr;

// Everything one request streamed.
struct Collected {
  std::vector<int32_t> tokens;
  std::string text;
  FinishReason reason = FinishReason::kNone;
  Usage usage;
  absl::Status status;
  int messages = 0;
  bool timed_out = false;
};

Collected Drain(RequestStream& stream, std::chrono::seconds limit = std::chrono::seconds(60)) {
  Collected collected;
  const auto deadline = std::chrono::steady_clock::now() + limit;
  while (std::chrono::steady_clock::now() < deadline) {
    std::optional<GenerationOutput> output = stream.Next(std::chrono::milliseconds(100));
    if (!output.has_value()) continue;
    ++collected.messages;
    collected.tokens.insert(collected.tokens.end(), output->token_ids.begin(),
                            output->token_ids.end());
    collected.text += output->text;
    if (output->is_last()) {
      collected.reason = output->finish_reason;
      collected.usage = output->usage;
      collected.status = output->status;
      return collected;
    }
  }
  collected.timed_out = true;
  return collected;
}

// A 30-token prompt of plain bytes.
std::vector<int32_t> Prompt30() {
  const std::string text = "The quick brown fox jumps over";
  return std::vector<int32_t>(text.begin(), text.end());
}

std::vector<int32_t> PromptOf(int length, int salt) {
  std::vector<int32_t> tokens;
  for (int i = 0; i < length; ++i) tokens.push_back((i * 37 + salt * 11 + 3) % 256);
  return tokens;
}

GenerationInput Greedy(std::vector<int32_t> prompt, int max_tokens) {
  GenerationInput input;
  input.prompt_tokens.assign(prompt.begin(), prompt.end());
  input.max_tokens = max_tokens;
  input.ignore_eos = true;
  return input;
}

class EngineTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    absl::StatusOr<LoadedModel> loaded = LoadModel("builtin:tiny");
    ASSERT_TRUE(loaded.ok()) << loaded.status();
    loaded_ = new LoadedModel(*std::move(loaded));
  }
  static void TearDownTestSuite() {
    delete loaded_;
    loaded_ = nullptr;
  }

  static EngineOptions SmallOptions() {
    EngineOptions options;
    options.kv_cache_bytes = 8ll << 20;  // ~400 blocks of 16 tokens for builtin:tiny
    return options;
  }

  static std::unique_ptr<Engine> MakeEngine(EngineOptions options,
                                            prometheus::Registry* registry = nullptr) {
    absl::StatusOr<std::unique_ptr<Engine>> engine =
        Engine::CreateWithModel(loaded_->model, loaded_->tokenizer, options, registry);
    EXPECT_TRUE(engine.ok()) << engine.status();
    return engine.ok() ? *std::move(engine) : nullptr;
  }

  static Collected Run(Engine& engine, GenerationInput input) {
    absl::StatusOr<std::shared_ptr<RequestStream>> stream = engine.Submit(std::move(input));
    EXPECT_TRUE(stream.ok()) << stream.status();
    if (!stream.ok()) return {};
    Collected collected = Drain(**stream);
    EXPECT_FALSE(collected.timed_out);
    return collected;
  }

  // Greedy decoding straight through Model::Forward with its own KV cache: no scheduler, the
  // whole prompt in one step, then one token per step.
  static std::vector<int32_t> DirectGreedy(const std::vector<int32_t>& prompt, int max_tokens) {
    const Model& model = *loaded_->model;
    KvRows cache(model.config().num_hidden_layers, 64, 16, model.kv_row_dim());
    BlockAllocator cache_blocks(cache.num_blocks());
    std::optional<std::vector<int32_t>> blocks =
        cache_blocks.Allocate(cache.BlocksFor(static_cast<int>(prompt.size()) + max_tokens));
    EXPECT_TRUE(blocks.has_value());
    std::vector<int32_t> sequence = prompt;
    std::vector<int32_t> generated;
    int cached = 0;
    while (static_cast<int>(generated.size()) < max_tokens) {
      const BatchSequence batch{
          std::span<const int32_t>(&sequence[cached], sequence.size() - cached), cached, &*blocks,
          false};
      const std::vector<float> logits = model.Forward(std::span(&batch, 1), cache);
      cached = static_cast<int>(sequence.size());
      const int32_t token = ArgMax(logits);
      generated.push_back(token);
      sequence.push_back(token);
    }
    return generated;
  }

  // The ranks refresh their KV gauges right after the step that finished a request, so the
  // last message of a stream may arrive a moment before Stats() shows its blocks free.
  static int FreeBlocksSoon(Engine& engine) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    while (std::chrono::steady_clock::now() < deadline &&
           engine.Stats().kv_blocks_free != engine.Stats().kv_blocks_total) {
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    return engine.Stats().kv_blocks_free;
  }

  static void WaitForIdle(Engine& engine) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (std::chrono::steady_clock::now() < deadline &&
           (engine.Stats().running != 0 || engine.Stats().waiting != 0)) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }

  static LoadedModel* loaded_;
};

LoadedModel* EngineTest::loaded_ = nullptr;

// Forward steps that processed tokens, from the step-duration histogram.
uint64_t StepCount(prometheus::Registry& registry) {
  uint64_t count = 0;
  for (const prometheus::MetricFamily& family : registry.Collect()) {
    if (family.name != "moeserve_step_duration_seconds") continue;
    for (const prometheus::ClientMetric& metric : family.metric)
      count += metric.histogram.sample_count;
  }
  return count;
}

TEST_F(EngineTest, GreedyMatchesDirectDecodeThroughTheModel) {
  std::unique_ptr<Engine> engine = MakeEngine(SmallOptions());
  ASSERT_NE(engine, nullptr);
  const Collected result = Run(*engine, Greedy(Prompt30(), 10));
  EXPECT_EQ(result.reason, FinishReason::kLength);
  EXPECT_THAT(result.tokens, ElementsAreArray(DirectGreedy(Prompt30(), 10)));
}

TEST_F(EngineTest, ChunkedPrefillGivesTheSameGreedyTokens) {
  EngineOptions chunked_options = SmallOptions();
  chunked_options.max_batch_tokens = 4;
  EngineOptions whole_options = SmallOptions();
  whole_options.max_batch_tokens = 512;
  prometheus::Registry chunked_registry, whole_registry;
  std::unique_ptr<Engine> chunked = MakeEngine(chunked_options, &chunked_registry);
  std::unique_ptr<Engine> whole = MakeEngine(whole_options, &whole_registry);
  ASSERT_NE(chunked, nullptr);
  ASSERT_NE(whole, nullptr);

  const Collected a = Run(*chunked, Greedy(Prompt30(), 8));
  const Collected b = Run(*whole, Greedy(Prompt30(), 8));
  EXPECT_EQ(a.reason, FinishReason::kLength);
  EXPECT_EQ(b.reason, FinishReason::kLength);
  ASSERT_EQ(a.tokens.size(), 8u);
  EXPECT_EQ(a.tokens, b.tokens);
  // 30 prompt tokens at 4 per step take 8 steps (the last yields the first token), then 7 decode
  // steps; unchunked, 1 + 7.
  EXPECT_EQ(StepCount(chunked_registry), 8u + 7u);
  EXPECT_EQ(StepCount(whole_registry), 1u + 7u);
}

TEST_F(EngineTest, GreedyRequestIsTheSameAloneAndInABusyBatch) {
  std::unique_ptr<Engine> alone_engine = MakeEngine(SmallOptions());
  ASSERT_NE(alone_engine, nullptr);
  const Collected alone = Run(*alone_engine, Greedy(Prompt30(), 12));
  ASSERT_EQ(alone.tokens.size(), 12u);

  // A busy engine with a small step budget: the request's prefill is chunked and shares steps
  // with other requests' prefills and decodes (greedy and sampled, of different lengths).
  EngineOptions busy_options = SmallOptions();
  busy_options.max_batch_tokens = 24;
  std::unique_ptr<Engine> busy = MakeEngine(busy_options);
  ASSERT_NE(busy, nullptr);
  std::vector<std::shared_ptr<RequestStream>> others;
  std::shared_ptr<RequestStream> target;
  for (int i = 0; i < 10; ++i) {
    GenerationInput input = Greedy(PromptOf(5 + 9 * i, i), 4 + 3 * (i % 5));
    if (i % 2 == 1) {
      input.sampling.temperature = 1.0f;
      input.sampling.seed = 100 + i;
    }
    absl::StatusOr<std::shared_ptr<RequestStream>> stream = busy->Submit(std::move(input));
    ASSERT_TRUE(stream.ok()) << stream.status();
    others.push_back(*stream);
    if (i == 4) {
      absl::StatusOr<std::shared_ptr<RequestStream>> t = busy->Submit(Greedy(Prompt30(), 12));
      ASSERT_TRUE(t.ok()) << t.status();
      target = *t;
    }
  }
  const Collected together = Drain(*target);
  ASSERT_FALSE(together.timed_out);
  EXPECT_EQ(together.reason, FinishReason::kLength);
  EXPECT_EQ(together.tokens, alone.tokens);
  for (auto& stream : others) {
    const Collected other = Drain(*stream);
    EXPECT_FALSE(other.timed_out);
    EXPECT_EQ(other.reason, FinishReason::kLength);
  }
  WaitForIdle(*busy);
  EXPECT_EQ(FreeBlocksSoon(*busy), busy->Stats().kv_blocks_total);
}

TEST_F(EngineTest, GreedyIsTheSameWithExpertParallelismAndDisaggregation) {
  // Placement and parallel layout never change the math: the same greedy tokens from one rank,
  // from two expert-parallel ranks, and from a prefill rank handing its KV cache to a decode rank.
  std::unique_ptr<Engine> single = MakeEngine(SmallOptions());
  ASSERT_NE(single, nullptr);
  const Collected expected = Run(*single, Greedy(Prompt30(), 10));
  ASSERT_EQ(expected.tokens.size(), 10u);

  EngineOptions ep2 = SmallOptions();
  ep2.parallel.decode_ep = 2;
  EngineOptions disaggregated = SmallOptions();
  disaggregated.parallel.prefill_ep = 1;
  disaggregated.parallel.decode_ep = 1;
  for (const EngineOptions& options : {ep2, disaggregated}) {
    std::unique_ptr<Engine> engine = MakeEngine(options);
    ASSERT_NE(engine, nullptr);
    std::vector<std::shared_ptr<RequestStream>> streams;
    for (int i = 0; i < 3; ++i) {
      absl::StatusOr<std::shared_ptr<RequestStream>> s = engine->Submit(Greedy(Prompt30(), 10));
      ASSERT_TRUE(s.ok()) << s.status();
      streams.push_back(*s);
    }
    for (auto& stream : streams) {
      const Collected result = Drain(*stream);
      EXPECT_EQ(result.reason, FinishReason::kLength);
      EXPECT_EQ(result.tokens, expected.tokens) << "prefill_ep " << options.parallel.prefill_ep
                                                << ", decode_ep " << options.parallel.decode_ep;
    }
    EXPECT_EQ(FreeBlocksSoon(*engine), engine->Stats().kv_blocks_total);
  }
}

TEST_F(EngineTest, SameSeedSameSampledTokensAloneAndBusy) {
  GenerationInput input = Greedy(Prompt30(), 12);
  input.sampling.temperature = 1.5f;
  input.sampling.top_p = 0.95f;
  input.sampling.seed = 77;
  std::unique_ptr<Engine> engine = MakeEngine(SmallOptions());
  ASSERT_NE(engine, nullptr);
  const Collected first = Run(*engine, input);
  std::vector<std::shared_ptr<RequestStream>> others;
  for (int i = 0; i < 4; ++i) {
    absl::StatusOr<std::shared_ptr<RequestStream>> s = engine->Submit(Greedy(PromptOf(20, i), 10));
    ASSERT_TRUE(s.ok());
    others.push_back(*s);
  }
  const Collected second = Run(*engine, input);
  for (auto& s : others) Drain(*s);
  EXPECT_EQ(first.tokens, second.tokens);
  input.sampling.seed = 78;
  const Collected other_seed = Run(*engine, input);
  EXPECT_NE(other_seed.tokens, first.tokens);
}

TEST_F(EngineTest, MaxTokensEndsWithLengthAfterExactlyMaxTokens) {
  std::unique_ptr<Engine> engine = MakeEngine(SmallOptions());
  ASSERT_NE(engine, nullptr);
  GenerationInput input;
  input.text = "hello";
  input.max_tokens = 7;
  input.ignore_eos = true;
  const Collected result = Run(*engine, input);
  EXPECT_TRUE(result.status.ok()) << result.status;
  EXPECT_EQ(result.reason, FinishReason::kLength);
  EXPECT_EQ(result.tokens.size(), 7u);
  EXPECT_EQ(result.usage.completion_tokens, 7);
  EXPECT_EQ(result.usage.prompt_tokens, 6);  // <bos> + 5 bytes
  EXPECT_EQ(FreeBlocksSoon(*engine), engine->Stats().kv_blocks_total);
}

TEST_F(EngineTest, StopTokenIdEndsTheStreamAtItsFirstOccurrence) {
  std::unique_ptr<Engine> engine = MakeEngine(SmallOptions());
  ASSERT_NE(engine, nullptr);
  const Collected reference = Run(*engine, Greedy(Prompt30(), 16));
  ASSERT_EQ(reference.tokens.size(), 16u);
  const int32_t stop_token = reference.tokens[5];
  const size_t first = std::find(reference.tokens.begin(), reference.tokens.end(), stop_token) -
                       reference.tokens.begin();
  GenerationInput input = Greedy(Prompt30(), 16);
  input.stop_token_ids = {stop_token};
  const Collected stopped = Run(*engine, input);
  EXPECT_EQ(stopped.reason, FinishReason::kStop);
  EXPECT_THAT(stopped.tokens,
              ElementsAreArray(reference.tokens.begin(), reference.tokens.begin() + first + 1));
}

// Byte offsets where a UTF-8 character starts.
std::vector<size_t> CharacterStarts(const std::string& text) {
  std::vector<size_t> starts;
  for (size_t i = 0; i < text.size(); ++i) {
    if ((static_cast<unsigned char>(text[i]) & 0xC0) != 0x80) starts.push_back(i);
  }
  return starts;
}

TEST_F(EngineTest, StopStringCutsTheTextBeforeTheMatch) {
  std::unique_ptr<Engine> engine = MakeEngine(SmallOptions());
  ASSERT_NE(engine, nullptr);
  const Collected reference = Run(*engine, Greedy(Prompt30(), 24));
  const std::vector<size_t> starts = CharacterStarts(reference.text);
  ASSERT_GE(starts.size(), 6u) << "the greedy text is too short to pick a stop string from";
  // Two characters from the middle of the generated text (spanning several byte tokens).
  const size_t begin = starts[3];
  const std::string stop = reference.text.substr(begin, starts[5] - begin);
  const size_t cut = reference.text.find(stop);
  ASSERT_GT(cut, 0u);

  GenerationInput input = Greedy(Prompt30(), 24);
  input.stop = {"this string never appears \x01\x02", stop};
  const Collected stopped = Run(*engine, input);
  EXPECT_EQ(stopped.reason, FinishReason::kStop);
  EXPECT_EQ(stopped.text, reference.text.substr(0, cut));
  EXPECT_LT(stopped.tokens.size(), reference.tokens.size());
  EXPECT_THAT(stopped.tokens, ElementsAreArray(reference.tokens.begin(),
                                               reference.tokens.begin() + stopped.tokens.size()));
  EXPECT_EQ(FreeBlocksSoon(*engine), engine->Stats().kv_blocks_total);
}

TEST_F(EngineTest, TextOfAFinishedStreamIsTheDecodedTokens) {
  std::unique_ptr<Engine> engine = MakeEngine(SmallOptions());
  ASSERT_NE(engine, nullptr);
  const Collected result = Run(*engine, Greedy(Prompt30(), 20));
  Utf8StreamDecoder decoder;
  std::string expected;
  for (int32_t token : result.tokens)
    expected += decoder.Push(loaded_->tokenizer->TokenBytes(token));
  expected += decoder.Flush();
  EXPECT_EQ(result.text, expected);
}

TEST_F(EngineTest, CancellingARunningStreamFreesItsBlocks) {
  EngineOptions options = SmallOptions();
  options.min_step_seconds = 0.01;  // keep the request in flight
  std::unique_ptr<Engine> engine = MakeEngine(options);
  ASSERT_NE(engine, nullptr);
  const int total = engine->Stats().kv_blocks_total;
  absl::StatusOr<std::shared_ptr<RequestStream>> stream = engine->Submit(Greedy(Prompt30(), 1000));
  ASSERT_TRUE(stream.ok()) << stream.status();
  std::optional<GenerationOutput> first = (*stream)->Next(std::chrono::seconds(30));
  ASSERT_TRUE(first.has_value());
  ASSERT_FALSE(first->is_last());
  EXPECT_LT(engine->Stats().kv_blocks_free, total) << "a running request holds KV blocks";
  (*stream)->Cancel();
  const Collected rest = Drain(**stream);
  ASSERT_FALSE(rest.timed_out);
  EXPECT_EQ(rest.reason, FinishReason::kCancelled);
  EXPECT_LT(rest.usage.completion_tokens, 1000);
  EXPECT_EQ(FreeBlocksSoon(*engine), total);
  WaitForIdle(*engine);
  EXPECT_EQ(engine->Stats().running, 0);
}

TEST_F(EngineTest, CancellingAWaitingStreamEndsIt) {
  EngineOptions options = SmallOptions();
  options.min_step_seconds = 0.01;
  options.max_running_requests = 1;
  std::unique_ptr<Engine> engine = MakeEngine(options);
  ASSERT_NE(engine, nullptr);
  absl::StatusOr<std::shared_ptr<RequestStream>> running = engine->Submit(Greedy(Prompt30(), 1000));
  absl::StatusOr<std::shared_ptr<RequestStream>> waiting = engine->Submit(Greedy(Prompt30(), 10));
  ASSERT_TRUE(running.ok());
  ASSERT_TRUE(waiting.ok());
  ASSERT_TRUE((*running)->Next(std::chrono::seconds(30)).has_value());
  (*waiting)->Cancel();
  const Collected waited = Drain(**waiting);
  EXPECT_EQ(waited.reason, FinishReason::kCancelled);
  EXPECT_TRUE(waited.tokens.empty());
  (*running)->Cancel();
  EXPECT_EQ(Drain(**running).reason, FinishReason::kCancelled);
  EXPECT_EQ(FreeBlocksSoon(*engine), engine->Stats().kv_blocks_total);
}

TEST_F(EngineTest, AShortRequestIsNotStarvedBehindLongOnes) {
  // The KV cache holds two long requests at a time; six are queued before a short one. The short
  // one used to wait for four of them to finish (first come, first served on blocks, then
  // prefill in admission order); now it passes the ones whose blocks do not fit and its prompt
  // gets a fair share of each step, so it finishes first.
  EngineOptions options = SmallOptions();
  options.min_step_seconds = 0.002;
  options.kv_cache_bytes = 150 * 20480;  // 150 blocks of 16 rows of builtin:tiny
  std::unique_ptr<Engine> engine = MakeEngine(options);
  ASSERT_NE(engine, nullptr);
  ASSERT_EQ(engine->Stats().kv_blocks_total, 150);
  std::vector<std::shared_ptr<RequestStream>> streams;
  for (int i = 0; i < 6; ++i) {
    absl::StatusOr<std::shared_ptr<RequestStream>> stream =
        engine->Submit(Greedy(PromptOf(1000, i), 100));  // 69 blocks each
    ASSERT_TRUE(stream.ok()) << stream.status();
    streams.push_back(*stream);
  }
  absl::StatusOr<std::shared_ptr<RequestStream>> short_stream =
      engine->Submit(Greedy(PromptOf(32, 9), 8));
  ASSERT_TRUE(short_stream.ok());
  streams.push_back(*short_stream);
  std::atomic<int> next_to_finish{0};
  std::vector<int> finished_as(streams.size(), -1);
  std::vector<std::thread> drains;
  for (size_t i = 0; i < streams.size(); ++i) {
    drains.emplace_back([&, i] {
      const Collected collected = Drain(*streams[i], std::chrono::seconds(300));
      EXPECT_FALSE(collected.timed_out);
      EXPECT_EQ(collected.reason, FinishReason::kLength);
      finished_as[i] = next_to_finish++;
    });
  }
  for (auto& drain : drains) drain.join();
  EXPECT_EQ(finished_as.back(), 0)
      << "the short request finished after " << finished_as.back() << " long ones";
}

TEST_F(EngineTest, ShutdownAbortsUnfinishedRequests) {
  EngineOptions options = SmallOptions();
  options.min_step_seconds = 0.01;
  std::unique_ptr<Engine> engine = MakeEngine(options);
  ASSERT_NE(engine, nullptr);
  absl::StatusOr<std::shared_ptr<RequestStream>> stream = engine->Submit(Greedy(Prompt30(), 1000));
  ASSERT_TRUE(stream.ok());
  ASSERT_TRUE((*stream)->Next(std::chrono::seconds(30)).has_value());
  engine->Shutdown();
  EXPECT_EQ(Drain(**stream).reason, FinishReason::kAborted);
  const absl::StatusOr<std::shared_ptr<RequestStream>> after =
      engine->Submit(Greedy(Prompt30(), 4));
  EXPECT_EQ(after.status().code(), absl::StatusCode::kUnavailable);
}

TEST_F(EngineTest, FullQueueIsResourceExhausted) {
  EngineOptions options = SmallOptions();
  options.max_queue = 0;
  std::unique_ptr<Engine> engine = MakeEngine(options);
  ASSERT_NE(engine, nullptr);
  const absl::StatusOr<std::shared_ptr<RequestStream>> stream =
      engine->Submit(Greedy(Prompt30(), 4));
  ASSERT_FALSE(stream.ok());
  EXPECT_EQ(stream.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(stream.status().message(), HasSubstr("queue is full"));
  EXPECT_EQ(engine->Stats().waiting, 0);
}

TEST_F(EngineTest, StopAcceptingIsUnavailable) {
  std::unique_ptr<Engine> engine = MakeEngine(SmallOptions());
  ASSERT_NE(engine, nullptr);
  engine->StopAccepting();
  const absl::StatusOr<std::shared_ptr<RequestStream>> stream =
      engine->Submit(Greedy(Prompt30(), 4));
  EXPECT_EQ(stream.status().code(), absl::StatusCode::kUnavailable);
}

TEST_F(EngineTest, SubmitValidatesWithActionableMessages) {
  std::unique_ptr<Engine> engine = MakeEngine(SmallOptions());
  ASSERT_NE(engine, nullptr);
  const int context = engine->model_info().context_length;  // 4096
  struct Case {
    std::string name;
    GenerationInput input;
    std::string message;
  };
  std::vector<Case> cases;
  auto add = [&](std::string name, auto mutate, std::string message) {
    GenerationInput input = Greedy(PromptOf(10, 0), 4);
    mutate(input);
    cases.push_back({std::move(name), std::move(input), std::move(message)});
  };
  add(
      "no input", [](GenerationInput& in) { in.prompt_tokens.clear(); }, "no input");
  add(
      "empty text", [](GenerationInput& in) { in.text = ""; }, "text is empty");
  add(
      "token id >= vocab", [](GenerationInput& in) { in.prompt_tokens[3] = 258; },
      "token_ids[3] = 258 is out of range: the vocabulary has 258 tokens");
  add(
      "negative token id", [](GenerationInput& in) { in.prompt_tokens[0] = -1; }, "out of range");
  add(
      "token id 2^31", [](GenerationInput& in) { in.prompt_tokens[2] = int64_t{1} << 31; },
      "token_ids[2] = 2147483648 is out of range");
  add(
      "token id 2^32 - 1", [](GenerationInput& in) { in.prompt_tokens[2] = 0xFFFFFFFFll; },
      "token_ids[2] = 4294967295 is out of range");
  add(
      "stop token 2^31", [](GenerationInput& in) { in.stop_token_ids = {int64_t{1} << 31}; },
      "stop_token_ids has 2147483648");
  add(
      "max_tokens 0", [](GenerationInput& in) { in.max_tokens = 0; },
      "max_tokens must be at least 1");
  add(
      "max_tokens beyond context", [&](GenerationInput& in) { in.max_tokens = context + 1; },
      "exceeds the context length");
  add(
      "prompt + max_tokens beyond context",
      [&](GenerationInput& in) { in.max_tokens = context - 5; },
      "lower max_tokens to at most 4086");
  add(
      "prompt beyond context", [&](GenerationInput& in) { in.prompt_tokens.assign(context, 65); },
      "the context length is 4096");
  add(
      "negative temperature", [](GenerationInput& in) { in.sampling.temperature = -0.5f; },
      "temperature");
  add(
      "NaN temperature",
      [](GenerationInput& in) {
        in.sampling.temperature = std::numeric_limits<float>::quiet_NaN();
      },
      "temperature");
  add(
      "infinite temperature",
      [](GenerationInput& in) { in.sampling.temperature = std::numeric_limits<float>::infinity(); },
      "temperature");
  add(
      "top_p above 1", [](GenerationInput& in) { in.sampling.top_p = 1.5f; },
      "top_p must be in [0, 1]");
  add(
      "negative top_p", [](GenerationInput& in) { in.sampling.top_p = -0.1f; }, "top_p");
  add(
      "NaN top_p",
      [](GenerationInput& in) { in.sampling.top_p = std::numeric_limits<float>::quiet_NaN(); },
      "top_p");
  add(
      "negative top_k", [](GenerationInput& in) { in.sampling.top_k = -1; }, "top_k");
  add(
      "empty stop string", [](GenerationInput& in) { in.stop = {""}; }, "stop strings must be");
  add(
      "too many stop strings", [](GenerationInput& in) { in.stop.assign(17, "x"); },
      "at most 16 stop strings");
  add(
      "stop token out of range",
      [](GenerationInput& in) {
        in.stop_token_ids = {7, 300};
      },
      "stop_token_ids");
  add(
      "request id too long", [](GenerationInput& in) { in.request_id.assign(300, 'r'); },
      "request_id");
  add(
      "oversized text", [&](GenerationInput& in) { in.text = std::string(context * 8 + 1, 'a'); },
      "far beyond the context length");

  for (Case& c : cases) {
    const absl::StatusOr<std::shared_ptr<RequestStream>> stream = engine->Submit(c.input);
    ASSERT_FALSE(stream.ok()) << c.name;
    EXPECT_EQ(stream.status().code(), absl::StatusCode::kInvalidArgument) << c.name;
    EXPECT_THAT(stream.status().message(), HasSubstr(c.message)) << c.name;
  }
  const EngineStats stats = engine->Stats();
  EXPECT_EQ(stats.waiting + stats.running, 0);
  // A valid request still goes through afterwards.
  EXPECT_EQ(Run(*engine, Greedy(PromptOf(10, 0), 2)).reason, FinishReason::kLength);
}

TEST_F(EngineTest, RequestLargerThanTheWholeKvCacheIsRejected) {
  EngineOptions options = SmallOptions();
  // builtin:tiny: 4 layers * 16 tokens * (64 + 16) floats * 4 bytes = 20480 bytes per block.
  options.kv_cache_bytes = 2 * 20480;
  std::unique_ptr<Engine> engine = MakeEngine(options);
  ASSERT_NE(engine, nullptr);
  EXPECT_EQ(engine->Stats().kv_blocks_total, 2);
  const absl::StatusOr<std::shared_ptr<RequestStream>> stream =
      engine->Submit(Greedy(PromptOf(10, 0), 30));  // 40 tokens -> 3 blocks
  ASSERT_FALSE(stream.ok());
  EXPECT_EQ(stream.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(stream.status().message(), HasSubstr("needs 3 KV cache blocks"));
  // 32 tokens fit exactly.
  EXPECT_EQ(Run(*engine, Greedy(PromptOf(10, 0), 22)).reason, FinishReason::kLength);
}

TEST_F(EngineTest, CreateRejectsBadOptions) {
  EngineOptions options = SmallOptions();
  options.max_batch_tokens = 0;
  EXPECT_FALSE(Engine::CreateWithModel(loaded_->model, loaded_->tokenizer, options).ok());
  options = SmallOptions();
  options.kv_cache_bytes = 100;
  const auto engine = Engine::CreateWithModel(loaded_->model, loaded_->tokenizer, options);
  ASSERT_FALSE(engine.ok());
  EXPECT_THAT(engine.status().message(), HasSubstr("holds no block"));
}

TEST_F(EngineTest, ModelsWithGpuOnlyExpertsAreRefusedOnTheCpu) {
  ModelConfig config = loaded_->model->config();
  config.routed_experts_on_device = true;
  auto model = std::make_shared<Model>(ModelWeights::Generate(config, 1));
  EXPECT_EQ(model->weights().layer(1).moe.experts[0].gate_proj, nullptr);
  const auto engine = Engine::CreateWithModel(model, loaded_->tokenizer, SmallOptions());
  ASSERT_FALSE(engine.ok());
  EXPECT_EQ(engine.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(engine.status().message(), HasSubstr("--device cuda"));
}

TEST_F(EngineTest, DisaggregationIsRefusedWithAGpuBackend) {
  EngineOptions options = SmallOptions();
  options.parallel.prefill_ep = 1;
  options.device = "cuda";  // refused before the GPU backend would be loaded
  const auto engine = Engine::CreateWithModel(loaded_->model, loaded_->tokenizer, options);
  ASSERT_FALSE(engine.ok());
  EXPECT_THAT(engine.status().message(), HasSubstr("disaggregation runs on the CPU only"));
}

TEST_F(EngineTest, StopStringsNeedATokenizer) {
  absl::StatusOr<std::unique_ptr<Engine>> engine =
      Engine::CreateWithModel(loaded_->model, nullptr, SmallOptions());
  ASSERT_TRUE(engine.ok()) << engine.status();
  GenerationInput input = Greedy(PromptOf(5, 0), 3);
  input.stop = {"x"};
  const auto stream = (*engine)->Submit(input);
  EXPECT_THAT(stream.status().message(), HasSubstr("stop_token_ids"));
  GenerationInput text_input;
  text_input.text = "hi";
  text_input.max_tokens = 3;
  EXPECT_THAT((*engine)->Submit(text_input).status().message(), HasSubstr("send token_ids"));
}

}  // namespace
}  // namespace moeserve::engine
