// The OpenAI request parser and response writers: what a request's JSON turns into, which
// requests are refused with which status, and the exact shape of chunks and errors.
#include "server/openai_protocol.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moeserve::server {
namespace {

using nlohmann::json;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

const OpenAiModel kModel{.name = "builtin:tiny", .context_length = 4096};

absl::StatusOr<OpenAiRequest> Completion(const std::string& body) {
  return ParseOpenAiRequest(false, body, kModel, "cmpl-1");
}

TEST(OpenAiProtocol, CompletionDefaultsFollowOpenAi) {
  auto request = Completion(R"({"model": "builtin:tiny", "prompt": "hi"})");
  ASSERT_TRUE(request.ok()) << request.status();
  ASSERT_EQ(request->choices.size(), 1u);
  const engine::GenerationInput& input = request->choices[0];
  EXPECT_EQ(input.text, "hi");
  EXPECT_TRUE(input.add_special_tokens);
  EXPECT_EQ(input.max_tokens, 16);
  EXPECT_EQ(input.sampling.temperature, 1.0f);
  EXPECT_EQ(input.sampling.top_p, 1.0f);
  EXPECT_FALSE(input.sampling.seed.has_value());
  EXPECT_EQ(input.request_id, "cmpl-1-0");
  EXPECT_FALSE(request->stream);
  // `model` may be left out: the one served model.
  EXPECT_TRUE(Completion(R"({"prompt": "hi"})").ok());
}

TEST(OpenAiProtocol, FieldsMapOntoTheEngineInput) {
  auto request = Completion(R"({"prompt": [1, 2, 3], "max_tokens": 5, "temperature": 0,
      "top_p": 0.5, "top_k": 7, "seed": 11, "stop": "x", "stream": true,
      "stream_options": {"include_usage": true}, "ignore_eos": true, "n": 2})");
  ASSERT_TRUE(request.ok()) << request.status();
  EXPECT_TRUE(request->stream && request->include_usage);
  ASSERT_EQ(request->choices.size(), 2u);
  for (int i = 0; i < 2; ++i) {
    const engine::GenerationInput& input = request->choices[i];
    EXPECT_THAT(input.prompt_tokens, ElementsAre(1, 2, 3));
    EXPECT_EQ(input.max_tokens, 5);
    EXPECT_EQ(input.sampling.temperature, 0.0f);
    EXPECT_EQ(input.sampling.top_p, 0.5f);
    EXPECT_EQ(input.sampling.top_k, 7);
    EXPECT_EQ(input.sampling.seed, 11u + i);  // choices differ, and repeat with the seed
    EXPECT_THAT(input.stop, ElementsAre("x"));
    EXPECT_TRUE(input.ignore_eos);
  }
  // max_completion_tokens is the newer name of max_tokens.
  auto newer = ParseOpenAiRequest(
      true, R"({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 9})",
      kModel, "c");
  ASSERT_FALSE(newer.ok());  // no chat template in kModel
  EXPECT_THAT(newer.status().message(), HasSubstr("--chat-template"));
}

TEST(OpenAiProtocol, ChatIsUnavailableWhereTemplatesCannotBeRendered) {
  // A host without the Python runtime for templates still serves completions; chat answers
  // 503 with the reason instead of the server refusing to start.
  OpenAiModel model = kModel;
  model.chat_unavailable = "cannot start the embedded Python for chat templates: no stdlib";
  auto chat =
      ParseOpenAiRequest(true, R"({"messages": [{"role": "user", "content": "x"}]})", model, "c");
  ASSERT_FALSE(chat.ok());
  EXPECT_EQ(chat.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(chat.status().message(), HasSubstr("no stdlib"));
  EXPECT_TRUE(ParseOpenAiRequest(false, R"({"prompt": "x"})", model, "c").ok());
}

TEST(OpenAiProtocol, BatchedPromptsComeInOpenAisOrder) {
  auto request = Completion(R"({"prompt": ["a", "b"], "n": 2, "max_tokens": 1})");
  ASSERT_TRUE(request.ok());
  ASSERT_EQ(request->choices.size(), 4u);
  EXPECT_EQ(request->choices[0].text, "a");
  EXPECT_EQ(request->choices[1].text, "a");
  EXPECT_EQ(request->choices[2].text, "b");
  EXPECT_EQ(request->choices[3].request_id, "cmpl-1-3");
  auto lists = Completion(R"({"prompt": [[5, 6], [7]]})");
  ASSERT_TRUE(lists.ok());
  EXPECT_THAT(lists->choices[1].prompt_tokens, ElementsAre(7));
}

TEST(OpenAiProtocol, BadRequestsAreRefusedWithTheFieldNamed) {
  struct Case {
    std::string body;
    absl::StatusCode code;
    std::string says;
  };
  const std::vector<Case> cases = {
      {"not json", absl::StatusCode::kInvalidArgument, "not valid JSON"},
      {"[1]", absl::StatusCode::kInvalidArgument, "JSON object"},
      {R"({"model": "gpt-4", "prompt": "x"})", absl::StatusCode::kNotFound, "builtin:tiny"},
      {R"({"model": 3, "prompt": "x"})", absl::StatusCode::kInvalidArgument, "`model`"},
      {R"({})", absl::StatusCode::kInvalidArgument, "`prompt` is required"},
      {R"({"prompt": 5})", absl::StatusCode::kInvalidArgument, "`prompt`"},
      {R"({"prompt": ["a", 5]})", absl::StatusCode::kInvalidArgument, "`prompt`"},
      {R"({"prompt": "x", "max_tokens": 0})", absl::StatusCode::kInvalidArgument, "max_tokens"},
      {R"({"prompt": "x", "max_tokens": "5"})", absl::StatusCode::kInvalidArgument, "integer"},
      {R"({"prompt": "x", "temperature": 3})", absl::StatusCode::kInvalidArgument, "temperature"},
      {R"({"prompt": "x", "top_p": 0})", absl::StatusCode::kInvalidArgument, "top_p"},
      {R"({"prompt": "x", "n": 0})", absl::StatusCode::kInvalidArgument, "`n`"},
      {R"({"prompt": "x", "n": 17})", absl::StatusCode::kInvalidArgument, "at most 16"},
      {R"({"prompt": "x", "stop": [1]})", absl::StatusCode::kInvalidArgument, "`stop`"},
      {R"({"prompt": "x", "stream": "yes"})", absl::StatusCode::kInvalidArgument, "`stream`"},
      {R"({"prompt": "x", "stream_options": {"include_usage": true}})",
       absl::StatusCode::kInvalidArgument, "only with `stream: true`"},
      {R"({"prompt": "x", "logprobs": 2})", absl::StatusCode::kInvalidArgument, "logprobs"},
      {R"({"prompt": "x", "presence_penalty": 0.5})", absl::StatusCode::kInvalidArgument,
       "presence_penalty"},
      {R"({"prompt": "x", "best_of": 3})", absl::StatusCode::kInvalidArgument, "best_of"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.body);
    auto request = Completion(c.body);
    ASSERT_FALSE(request.ok());
    EXPECT_EQ(request.status().code(), c.code);
    EXPECT_THAT(request.status().message(), HasSubstr(c.says));
  }
  // Neutral values of unsupported fields are fine.
  EXPECT_TRUE(Completion(R"({"prompt": "x", "presence_penalty": 0, "frequency_penalty": 0,
      "logprobs": null, "logit_bias": {}, "user": "u"})")
                  .ok());
}

TEST(OpenAiProtocol, ErrorsHaveOpenAisShapeAndStatus) {
  EXPECT_EQ(HttpStatusFor(absl::InvalidArgumentError("x")), 400);
  EXPECT_EQ(HttpStatusFor(absl::NotFoundError("x")), 404);
  EXPECT_EQ(HttpStatusFor(absl::ResourceExhaustedError("x")), 429);
  EXPECT_EQ(HttpStatusFor(absl::UnavailableError("x")), 503);
  EXPECT_EQ(HttpStatusFor(absl::InternalError("x")), 500);
  const json body = json::parse(ErrorBody(absl::NotFoundError("no such model")));
  EXPECT_EQ(body, json::parse(R"({"error": {"message": "no such model",
      "type": "invalid_request_error", "param": null, "code": "model_not_found"}})"));
  EXPECT_EQ(json::parse(ErrorBody(absl::ResourceExhaustedError("full")))["error"]["type"],
            "rate_limit_error");
}

TEST(OpenAiProtocol, ChunksAreServerSentEvents) {
  const OpenAiResponseHeader chat{.id = "chatcmpl-1", .created = 7, .model = "m", .chat = true};
  const std::string event = StreamChunkEvent(chat, 0, "assistant", "hé", std::nullopt, true);
  ASSERT_TRUE(event.starts_with("data: ") && event.ends_with("\n\n"));
  EXPECT_EQ(json::parse(event.substr(6)), json::parse(R"({"id": "chatcmpl-1",
      "object": "chat.completion.chunk", "created": 7, "model": "m", "usage": null,
      "choices": [{"index": 0, "delta": {"role": "assistant", "content": "hé"},
                   "logprobs": null, "finish_reason": null}]})"));
  const OpenAiResponseHeader completion{.id = "cmpl-1", .created = 7, .model = "m"};
  const std::string last = StreamChunkEvent(completion, 2, std::nullopt, "", "stop", false);
  EXPECT_EQ(json::parse(last.substr(6)), json::parse(R"({"id": "cmpl-1",
      "object": "text_completion", "created": 7, "model": "m",
      "choices": [{"index": 2, "text": "", "logprobs": null, "finish_reason": "stop"}]})"));
  const json usage = json::parse(UsageEvent(completion, {3, 4}).substr(6));
  EXPECT_EQ(usage["usage"], json::parse(R"({"prompt_tokens": 3, "completion_tokens": 4,
                                           "total_tokens": 7})"));
  EXPECT_TRUE(usage["choices"].empty());
}

}  // namespace
}  // namespace moeserve::server
