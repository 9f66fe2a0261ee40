// ChatTemplate renders real chat templates (DeepSeek-V3.1, Qwen3, Mixtral) exactly as Hugging
// Face transformers' apply_chat_template does: tests/fixtures/chat_templates/expected.json holds
// transformers' renderings (make_expected.py), and every case must match byte for byte.
#include "server/chat_template.h"

#include <filesystem>
#include <fstream>
#include <sstream>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moeserve::server {
namespace {

using ::testing::HasSubstr;

std::string ReadFile(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

const std::filesystem::path kFixtures = MOESERVE_CHAT_TEMPLATE_FIXTURES;

TEST(ChatTemplate, MatchesTransformersOnRealTemplates) {
  const nlohmann::ordered_json fixtures =
      nlohmann::ordered_json::parse(ReadFile(kFixtures / "expected.json"));
  ASSERT_GE(fixtures["cases"].size(), 20u);
  for (const nlohmann::ordered_json& c : fixtures["cases"]) {
    SCOPED_TRACE(c["template"].get<std::string>() + ", " + c["conversation"].get<std::string>());
    ChatTemplateSource source{.text = ReadFile(kFixtures / c["template"].get<std::string>()),
                              .origin = c["template"].get<std::string>(),
                              .special_tokens = c["special_tokens"]};
    absl::StatusOr<std::unique_ptr<ChatTemplate>> compiled = ChatTemplate::Compile(source);
    ASSERT_TRUE(compiled.ok()) << compiled.status();
    absl::StatusOr<std::string> rendered = (*compiled)->Render(
        c["messages"], c["add_generation_prompt"].get<bool>(), c["tools"], c["variables"]);
    if (c.contains("expected_error")) {
      ASSERT_FALSE(rendered.ok());
      EXPECT_EQ(rendered.status().code(), absl::StatusCode::kInvalidArgument);
      EXPECT_THAT(rendered.status().message(), HasSubstr(c["expected_error"].get<std::string>()));
    } else {
      ASSERT_TRUE(rendered.ok()) << rendered.status();
      EXPECT_EQ(*rendered, c["expected"].get<std::string>());
    }
  }
}

TEST(ChatTemplate, TransformersExtensionsWork) {
  // {% generation %} blocks, loop controls, strftime_now and tojson's keyword arguments.
  ChatTemplateSource source{
      .text =
          "{% for m in messages %}{% if m.role == 'skip' %}{% continue %}{% endif %}"
          "{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}"
          "{{ messages[0] | tojson(indent=1) }}{{ strftime_now('%Y') | length }}",
      .origin = "test"};
  auto compiled = ChatTemplate::Compile(source);
  ASSERT_TRUE(compiled.ok()) << compiled.status();
  auto rendered = (*compiled)->Render(
      nlohmann::ordered_json::parse(R"([{"role": "user", "content": "é"}, {"role": "skip"}])"),
      false, nullptr, nlohmann::ordered_json::object());
  ASSERT_TRUE(rendered.ok()) << rendered.status();
  EXPECT_EQ(*rendered, "é{\n \"role\": \"user\",\n \"content\": \"é\"\n}4");
}

TEST(ChatTemplate, BadTemplatesAndFailingRendersAreInvalidArgument) {
  auto broken = ChatTemplate::Compile({.text = "{% for m in messages %}", .origin = "broken"});
  ASSERT_FALSE(broken.ok());
  EXPECT_EQ(broken.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(broken.status().message(), HasSubstr("broken"));

  // The sandbox refuses attribute access to internals.
  auto sandboxed =
      ChatTemplate::Compile({.text = "{{ messages.__class__.__mro__ }}", .origin = "sandbox"});
  ASSERT_TRUE(sandboxed.ok());
  auto rendered = (*sandboxed)->Render(nlohmann::ordered_json::array(), false, nullptr, {});
  EXPECT_FALSE(rendered.ok());

  // A template failing on the messages it gets (content missing).
  auto strict =
      ChatTemplate::Compile({.text = "{{ messages[0]['content'] + 'x' }}", .origin = "t"});
  ASSERT_TRUE(strict.ok());
  rendered = (*strict)->Render(
      nlohmann::ordered_json::parse(R"([{"role": "user", "content": null}])"), false, nullptr, {});
  ASSERT_FALSE(rendered.ok());
  EXPECT_EQ(rendered.status().code(), absl::StatusCode::kInvalidArgument);
}

class TemporaryFolder {
 public:
  TemporaryFolder() {
    path_ = std::filesystem::temp_directory_path() /
            ("moeserve-chat-template-" + std::to_string(::getpid()));
    std::filesystem::create_directories(path_);
  }
  ~TemporaryFolder() { std::filesystem::remove_all(path_); }
  const std::filesystem::path& path() const { return path_; }
  void Write(const std::string& name, const std::string& text) const {
    std::ofstream(path_ / name, std::ios::binary) << text;
  }

 private:
  std::filesystem::path path_;
};

TEST(LoadChatTemplateSource, ReadsTheCheckpointsTemplateAndSpecialTokens) {
  TemporaryFolder folder;
  folder.Write("tokenizer_config.json", R"({
      "bos_token": {"__type": "AddedToken", "content": "<B>", "lstrip": false},
      "eos_token": "<E>", "pad_token": null,
      "chat_template": [{"name": "tool_use", "template": "T"},
                        {"name": "default", "template": "{{ bos_token }}D{{ eos_token }}"}]})");
  auto source = LoadChatTemplateSource(folder.path().string(), "");
  ASSERT_TRUE(source.ok()) << source.status();
  ASSERT_TRUE(source->has_value());
  EXPECT_EQ((*source)->text, "{{ bos_token }}D{{ eos_token }}");
  EXPECT_EQ((*source)->special_tokens.dump(), R"({"bos_token":"<B>","eos_token":"<E>"})");
  EXPECT_FALSE((*source)->add_special_tokens);

  // --chat-template wins over the folder's.
  folder.Write("override.jinja", "O");
  source = LoadChatTemplateSource(folder.path().string(), (folder.path() / "override.jinja"));
  ASSERT_TRUE(source.ok() && source->has_value());
  EXPECT_EQ((*source)->text, "O");
}

TEST(LoadChatTemplateSource, FoldersWithoutOneHaveNoneAndBuiltinsHaveTheDefault) {
  TemporaryFolder folder;
  folder.Write("tokenizer_config.json", R"({"eos_token": "<E>"})");
  auto none = LoadChatTemplateSource(folder.path().string(), "");
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE(none->has_value());

  folder.Write("chat_template.jinja", "J");
  auto file = LoadChatTemplateSource(folder.path().string(), "");
  ASSERT_TRUE(file.ok() && file->has_value());
  EXPECT_EQ((*file)->text, "J");

  folder.Write("tokenizer_config.json", "{not json");
  EXPECT_EQ(LoadChatTemplateSource(folder.path().string(), "").status().code(),
            absl::StatusCode::kInvalidArgument);

  auto builtin = LoadChatTemplateSource("builtin:tiny", "");
  ASSERT_TRUE(builtin.ok() && builtin->has_value());
  EXPECT_TRUE((*builtin)->add_special_tokens);
  auto compiled = ChatTemplate::Compile(**builtin);
  ASSERT_TRUE(compiled.ok());
  auto rendered = (*compiled)->Render(
      nlohmann::ordered_json::parse(R"([{"role": "user", "content": "hi"}])"), true, nullptr, {});
  ASSERT_TRUE(rendered.ok());
  EXPECT_EQ(*rendered, "<|user|>\nhi\n<|assistant|>\n");
  EXPECT_EQ(LoadChatTemplateSource("builtin:tiny", "/nonexistent/template.jinja").status().code(),
            absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace moeserve::server
