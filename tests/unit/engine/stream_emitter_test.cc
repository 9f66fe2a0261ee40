// StreamEmitter without a model: the messages a sequence's tokens become — text with incomplete
// UTF-8 held back, stop strings cut (and possible prefixes of one held back), the end on
// <eos>, a stop token, max_tokens or the context length, usage on the last message, failures.
#include "engine/runtime/stream_emitter.h"

#include <memory>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moeserve::engine {
namespace {

constexpr int32_t kBos = 256;
constexpr int32_t kEos = 257;

struct Fixture {
  ByteTokenizer tokenizer{kBos, kEos};
  EngineMetrics metrics;  // records nothing
  StreamEmitter emitter{&tokenizer, kEos, /*context_length=*/64, metrics};
};

std::unique_ptr<Sequence> MakeSequence(int max_tokens, std::vector<std::string> stop = {}) {
  auto seq = std::make_unique<Sequence>();
  seq->tokens = {kBos, 'h', 'i'};
  seq->prompt_length = 3;
  seq->num_cached = 3;
  seq->input.max_tokens = max_tokens;
  seq->input.stop = std::move(stop);
  seq->stream = std::make_shared<RequestStream>("r");
  seq->arrival = Sequence::Clock::now();
  return seq;
}

// Emits `tokens` until the sequence ends; returns the concatenated text streamed and the end.
struct Streamed {
  std::string text;
  std::vector<int32_t> token_ids;
  FinishReason reason = FinishReason::kNone;
  Usage usage;
  int messages = 0;
};
Streamed EmitAll(Fixture& f, Sequence& seq, const std::vector<int32_t>& tokens) {
  std::shared_ptr<RequestStream> stream = seq.stream;
  for (int32_t token : tokens) {
    StreamEmitter::Emitted emitted = f.emitter.Emit(seq, token);
    if (emitted.reason != FinishReason::kNone) {
      f.emitter.Finish(seq, emitted.reason, std::move(emitted.last));
      break;
    }
  }
  Streamed streamed;
  while (auto output = stream->Next(std::chrono::milliseconds(0))) {
    ++streamed.messages;
    streamed.text += output->text;
    streamed.token_ids.insert(streamed.token_ids.end(), output->token_ids.begin(),
                              output->token_ids.end());
    if (output->is_last()) {
      streamed.reason = output->finish_reason;
      streamed.usage = output->usage;
    }
  }
  return streamed;
}

std::vector<int32_t> Bytes(const std::string& text) {
  return std::vector<int32_t>(text.begin(), text.end());
}

TEST(StreamEmitter, StreamsTokensAndEndsAtMaxTokensWithUsage) {
  Fixture f;
  auto seq = MakeSequence(4);
  const Streamed s = EmitAll(f, *seq, Bytes("abcdef"));
  EXPECT_EQ(s.text, "abcd");
  EXPECT_EQ(s.messages, 4);
  EXPECT_EQ(s.reason, FinishReason::kLength);
  EXPECT_EQ(s.usage.prompt_tokens, 3);
  EXPECT_EQ(s.usage.completion_tokens, 4);
  EXPECT_GE(s.usage.total_seconds, 0);
  EXPECT_TRUE(seq->finished());
  EXPECT_EQ(seq->tokens.size(), 7u) << "the generated tokens are appended";
}

TEST(StreamEmitter, IncompleteUtf8IsHeldBackUntilItsCharacterIsComplete) {
  Fixture f;
  auto seq = MakeSequence(10);
  const std::string snowman = "\xE2\x98\x83";  // U+2603, three bytes
  std::shared_ptr<RequestStream> stream = seq->stream;
  f.emitter.Emit(*seq, static_cast<uint8_t>(snowman[0]));
  f.emitter.Emit(*seq, static_cast<uint8_t>(snowman[1]));
  auto first = stream->Next(std::chrono::milliseconds(0));
  ASSERT_TRUE(first.has_value());
  EXPECT_EQ(first->text, "") << "the first byte alone is not text yet";
  stream->Next(std::chrono::milliseconds(0));
  f.emitter.Emit(*seq, static_cast<uint8_t>(snowman[2]));
  auto third = stream->Next(std::chrono::milliseconds(0));
  ASSERT_TRUE(third.has_value());
  EXPECT_EQ(third->text, snowman);
}

TEST(StreamEmitter, StopStringsAreCutAndTheirPossiblePrefixesHeldBack) {
  Fixture f;
  auto seq = MakeSequence(20, {"END"});
  std::shared_ptr<RequestStream> stream = seq->stream;
  const Streamed s = EmitAll(f, *seq, Bytes("abENxENDzz"));
  EXPECT_EQ(s.text, "abENx") << "text up to the stop string, nothing of it";
  EXPECT_EQ(s.reason, FinishReason::kStop);
  EXPECT_EQ(s.token_ids.size(), 8u) << "the tokens up to and including the match are reported";
}

TEST(StreamEmitter, EosAndStopTokensEndTheStreamUnlessEosIsIgnored) {
  {
    Fixture f;
    auto seq = MakeSequence(20);
    const Streamed s = EmitAll(f, *seq, {'a', kEos, 'b'});
    EXPECT_EQ(s.text, "a");
    EXPECT_EQ(s.reason, FinishReason::kStop);
  }
  {
    Fixture f;
    auto seq = MakeSequence(3);
    seq->input.ignore_eos = true;
    const Streamed s = EmitAll(f, *seq, {'a', kEos, 'b'});
    EXPECT_EQ(s.reason, FinishReason::kLength);
    EXPECT_EQ(s.token_ids.size(), 3u);
  }
  {
    Fixture f;
    auto seq = MakeSequence(20);
    seq->input.stop_token_ids = {'q'};
    const Streamed s = EmitAll(f, *seq, Bytes("abqcd"));
    EXPECT_EQ(s.reason, FinishReason::kStop);
    EXPECT_EQ(s.token_ids.size(), 3u);
  }
}

TEST(StreamEmitter, TheContextLengthEndsTheStream) {
  Fixture f;
  auto seq = MakeSequence(100);
  std::vector<int32_t> tokens(100, 'x');
  const Streamed s = EmitAll(f, *seq, tokens);
  EXPECT_EQ(s.reason, FinishReason::kContextLength);
  EXPECT_EQ(seq->tokens.size(), 64u);
}

TEST(StreamEmitter, FailEndsTheStreamWithTheStatusOnce) {
  Fixture f;
  auto seq = MakeSequence(10);
  std::shared_ptr<RequestStream> stream = seq->stream;
  f.emitter.Fail(*seq, absl::UnavailableError("group down"));
  f.emitter.Fail(*seq, absl::UnavailableError("again"));
  f.emitter.Finish(*seq, FinishReason::kAborted);
  auto output = stream->Next(std::chrono::milliseconds(0));
  ASSERT_TRUE(output.has_value());
  EXPECT_EQ(output->status.message(), "group down");
  EXPECT_FALSE(stream->Next(std::chrono::milliseconds(0)).has_value())
      << "an ended stream gets nothing more";
}

}  // namespace
}  // namespace moeserve::engine
